"""Device mesh, logical-axis rules tables, and sharded initialisation.

Mesh axis names appear only in this file; everything else speaks of logical axes (batch, embed,
heads, ...). Two tables, one per mode: training shards params FSDP-style over `data` and
tensor-parallel over `model`, and the residual stream's tokens over `model` between blocks
(sequence parallelism); sampling keeps params replicated over `data` (tensor-parallel only) so
a decode step does no per-token all-gather of weights.

Multi-host rows: every process owns whole prompt groups, the rows of the batch that the mesh's
'data' axis places on its own devices (`process_rows`); `global_rows` builds global arrays from
each process's rows, `local_rows` reads them back, `gather_rows` shares small host arrays.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "model")
Rules = tuple[tuple[str, str | None], ...]

# Where each logical axis goes, by mode. The two tables differ in one row: training splits every
# weight matrix along its model dimension over 'data' (FSDP) as well as over 'model' (tensor
# parallel); sampling keeps weights whole over 'data', so a decode step reads them locally and
# does no per-token all-gather.
_SHARED_RULES: Rules = (
    ("batch", "data"),
    ("vocab", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("head_dim", None),
    ("layers", None),
    ("seq", None),
    ("act_embed", None),
    ("cache_seq", None),
)
# Training also splits the residual stream's tokens between blocks over 'model' (sequence
# parallelism as in Megatron-LM): each layer's saved input, all that a rematerialised backward
# pass keeps, takes 1/model of the memory; the tensor-parallel all-reduce after the attention
# and MLP outputs becomes a reduce-scatter, and an all-gather precedes the next block's
# projections (the same bytes moved).
TRAIN_RULES: Rules = (("embed", "data"), ("residual_seq", "model"), *_SHARED_RULES)
SAMPLE_RULES: Rules = (("embed", None), ("residual_seq", None), *_SHARED_RULES)

# Logical axes that fall back to replication when they do not divide the mesh axis: GQA models
# often have fewer kv heads than tensor-parallel shards (Qwen2.5-1.5B: 2), and copying kv heads
# is the standard remedy. Every other non-dividing dimension is an error.
REPLICATE_IF_INDIVISIBLE = frozenset({"kv_heads"})


def parse_mesh_shape(spec: str) -> tuple[int, int]:
    """'4x4' -> (4, 4); 'auto' -> (all devices, 1)."""
    if spec == "auto":
        return (jax.device_count(), 1)
    try:
        d, m = (int(s) for s in spec.lower().split("x"))
    except ValueError:
        raise ValueError(
            f"mesh {spec!r} is not of the form DxM (e.g. 4x4: data=4, model=4) or 'auto'"
        ) from None
    if d < 1 or m < 1:
        raise ValueError(f"mesh {spec!r}: both sizes must be at least 1")
    return d, m


def make_mesh(spec: str | tuple[int, int] = "auto", devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, model) mesh over all devices; D×M must equal the device count."""
    d, m = parse_mesh_shape(spec) if isinstance(spec, str) else spec
    devices = list(devices) if devices is not None else jax.devices()
    if d * m != len(devices):
        raise ValueError(
            f"mesh {d}x{m} needs {d * m} devices but {len(devices)} are available "
            f"({jax.process_count()} process(es)); choose D and M with D*M = {len(devices)}"
        )
    return jax.make_mesh(
        (d, m), MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices
    )


def data_size(mesh: Mesh | None) -> int:
    """Devices along the data axis (1 without a mesh): how many ways rows are split."""
    return 1 if mesh is None else mesh.shape[MESH_AXES[0]]


def model_size(mesh: Mesh | None) -> int:
    """Devices along the model axis (1 without a mesh): how many ways weights are split."""
    return 1 if mesh is None else mesh.shape[MESH_AXES[1]]


def mesh_axes_for(logical: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """Logical axis names -> a PartitionSpec of mesh axes."""
    return nn.logical_to_mesh_axes(tuple(logical), rules)


def logical_to_shardings(
    shapes: Any, logical: Any, mesh: Mesh, rules: Rules, what: str = "params"
) -> Any:
    """NamedShardings for a pytree of shapes, checking that every sharded dimension divides.

    Args:
      shapes: pytree of arrays or ShapeDtypeStructs.
      logical: matching pytree of logical PartitionSpecs (tuples of logical names).
      mesh: the device mesh.
      rules: a rules table (TRAIN_RULES or SAMPLE_RULES).
      what: a word for error messages.

    Returns:
      The matching pytree of NamedShardings.
    """
    shape_leaves, treedef = jax.tree.flatten_with_path(shapes)
    spec_leaves = treedef.flatten_up_to(
        jax.tree.map(lambda s: s, logical, is_leaf=lambda x: isinstance(x, PartitionSpec))
    )
    out = []
    for (path, x), names in zip(shape_leaves, spec_leaves):
        names = tuple(names) if names is not None else (None,) * len(x.shape)
        axes = list(mesh_axes_for(names, rules))
        axes += [None] * (len(x.shape) - len(axes))
        for i, (dim, axis) in enumerate(zip(x.shape, axes)):
            size = _axis_size(mesh, axis)
            if dim % size == 0:
                continue
            if names[i] in REPLICATE_IF_INDIVISIBLE:
                axes[i] = None
                continue
            raise ValueError(
                f"{what} {jax.tree_util.keystr(path)} with shape {tuple(x.shape)}: dimension {i} "
                f"({names[i]}={dim}) does not divide over mesh axis {axis!r} of size {size}; "
                f"choose a mesh whose {axis!r} size divides {dim}"
            )
        out.append(NamedSharding(mesh, PartitionSpec(*axes)))
    return treedef.unflatten(out)


def _axis_size(mesh: Mesh, axis: str | tuple[str, ...] | None) -> int:
    if axis is None:
        return 1
    names = (axis,) if isinstance(axis, str) else axis
    return math.prod(mesh.shape[a] for a in names)


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = SAMPLE_RULES) -> NamedSharding:
    """Leading axis over the batch (data) axis, the rest replicated."""
    return NamedSharding(mesh, mesh_axes_for(("batch",) + (None,) * (ndim - 1), rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules):
    """Makes the mesh and rules visible to `nn.with_logical_constraint` (use inside jit)."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
        yield


def with_rules(fn: Callable, mesh: Mesh, rules: Rules) -> Callable:
    """Wraps `fn` so that it is always traced under `activate(mesh, rules)`."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with activate(mesh, rules):
            return fn(*args, **kwargs)

    return wrapped


def active_mesh() -> jax.sharding.AbstractMesh | None:
    """The mesh made visible by `activate` (or `jax.set_mesh`), or None outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def active_platform() -> str:
    """The platform being compiled for: the active mesh's devices' (an AOT TPU topology counts),
    else JAX's default backend."""
    mesh = active_mesh()
    device = getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def active_spec(logical: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec | None:
    """The per-device split of an activation under the active mesh and rules, for `shard_map`:
    dimensions that do not divide their mesh axes are replicated. None outside a mesh."""
    mesh = active_mesh()
    if mesh is None:
        return None
    axes = list(nn.logical_to_mesh_axes(tuple(logical)))
    axes += [None] * (len(shape) - len(axes))
    return PartitionSpec(
        *(a if dim % _axis_size(mesh, a) == 0 else None for dim, a in zip(shape, axes))
    )


def reshard(tree: Any, shardings: Any) -> Any:
    """Moves a pytree to new shardings (e.g. train layout -> sample layout)."""
    return jax.device_put(tree, shardings)


def spec_snapshot(shardings: Any) -> dict[str, str]:
    """'param/path' -> str(PartitionSpec), for golden tests and logs."""
    flat = jax.tree.flatten_with_path(shardings)[0]
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): str(tuple(s.spec)) for path, s in flat
    }


# ----------------------------------------------------------------------------- multi-host rows


def process_rows(mesh: Mesh | None, n: int) -> slice:
    """The rows of an n-row batch split over the mesh's 'data' axis that this process holds.

    Whole prompt groups are owned by one process only if every process holds one contiguous
    block of rows, in process order (what `jax.make_mesh` gives when each data row of the mesh
    lies within one host). Raises ValueError naming the layout otherwise.
    """
    count = jax.process_count()
    if count == 1:
        return slice(0, n)
    if mesh is None:
        raise ValueError(
            f"{count} processes but no device mesh: a multi-host run must sample on a mesh"
        )
    d, m = mesh.shape["data"], mesh.shape["model"]
    if n % count or n % d:
        raise ValueError(
            f"a batch of {n} prompts does not split evenly over {count} processes and the mesh's "
            f"data axis ({d}); make the prompt batch (data.batch_prompts) a multiple of both"
        )
    block = n // count
    spans: dict[int, set[tuple[int, int]]] = {}
    rows = batch_sharding(mesh, 1)
    for device, index in rows.devices_indices_map((n,)).items():
        spans.setdefault(device.process_index, set()).add(index[0].indices(n)[:2])
    for proc, held in sorted(spans.items()):
        covered = sorted(held)
        want = (proc * block, (proc + 1) * block)
        contiguous = all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
        if not contiguous or (covered[0][0], covered[-1][1]) != want:
            raise ValueError(
                f"mesh {d}x{m} over {count} processes: process {proc} holds batch rows "
                f"{covered}, not the block {want} that owning whole prompt groups needs. Use a "
                "mesh whose model axis fits within one host's devices (model size dividing "
                f"{jax.local_device_count()}) and whose data axis is a multiple of {count}"
            )
    me = jax.process_index()
    return slice(me * block, (me + 1) * block)


def global_rows(tree: Any, mesh: Mesh | None, rules: Rules = TRAIN_RULES) -> Any:
    """Process-local row blocks -> global arrays with rows split over the mesh's 'data' axis.

    On one process the host arrays are placed on the mesh (or returned as they are without
    one); with several, each process passes its own `process_rows` block.
    """
    if mesh is None:
        return tree
    count = jax.process_count()

    def put(x):
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim, rules)
        if count == 1:
            return jax.device_put(x, sharding)
        shape = (x.shape[0] * count,) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(put, tree)


def local_rows(tree: Any) -> Any:
    """Global arrays split over 'data' -> this process's rows as numpy (all rows on one process).

    Shards that are copies of the same rows (replication over 'model') are read once.
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)

    def get(x):
        if x.ndim == 0 or x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        blocks = {}
        for shard in x.addressable_shards:
            blocks.setdefault(shard.index[0].indices(x.shape[0])[0], shard.data)
        return np.concatenate(jax.device_get([blocks[s] for s in sorted(blocks)]))

    return jax.tree.map(get, tree)


def gather_rows(x_local: np.ndarray) -> np.ndarray:
    """Every process's rows of a host array, concatenated in process order (collective)."""
    if jax.process_count() == 1:
        return np.asarray(x_local)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x_local), tiled=True))


def global_value(x: jax.Array | np.ndarray) -> np.ndarray:
    """The whole of a global array on every process (a collective where it spans processes);
    a host or process-local array as it is."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gather_strings(strings_local: Sequence[str]) -> list[str]:
    """Every process's strings, concatenated in process order (collective): as rows of UTF-8
    bytes padded to the longest, since the all-gather moves arrays."""
    if jax.process_count() == 1:
        return list(strings_local)
    encoded = [s.encode() for s in strings_local]
    width = int(gather_rows(np.array([max(map(len, encoded), default=0)])).max())
    rows = np.zeros((len(encoded), max(width, 1)), np.uint8)
    for i, b in enumerate(encoded):
        rows[i, : len(b)] = np.frombuffer(b, np.uint8)
    return [bytes(r).rstrip(b"\0").decode() for r in gather_rows(rows)]
