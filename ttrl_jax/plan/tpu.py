"""Cloud TPU slices by the names users rent them under, as abstract devices for the TPU compiler.

`slice_spec("v5e-16")` gives the slice's topology and per-chip figures; `compile_devices`
gives its devices for `jit(...).lower(...).compile()` with XLA:TPU on a machine without a TPU
(libtpu from `pip install -e '.[tpu]'`; JAX itself may run on the CPU). One JAX device is one
chip on every generation here: v4 and v5p join their two TensorCores as one "megacore" device,
and their slice names count TensorCores (v4-8 = 4 chips), while v5e and v6e names count chips.

Per-chip figures are the Cloud TPU system-architecture pages' (cloud.google.com/tpu/docs/
{v4,v5e,v5p,v6e}): HBM capacity, peak bf16 matmul rate and HBM bandwidth. The compiler's own
HBM limit is a little lower (the runtime reserves some): 30.75, 15.75, 95.74 and 31.25 GiB.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
from typing import Any

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """The chip of one TPU generation: its figures and how its slices are named and shaped."""

    hbm_gib: float
    peak_flops: float  # bf16 FLOP/s per chip
    hbm_bandwidth: float  # bytes/s per chip
    cores_per_chip: int  # TensorCores counted by the slice name per chip
    chip_config: str  # libtpu's chip configuration for the topology
    shapes: dict[int, str]  # chips -> topology shape
    chips_per_host: int


_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8"}

GENERATIONS: dict[str, Chip] = {
    "v4": Chip(32, 275e12, 1200e9, 2, "megacore", _3D, 4),
    "v5e": Chip(16, 197e12, 819e9, 1, "default", _2D, 8),
    "v5p": Chip(95, 459e12, 2765e9, 2, "megacore", _3D, 4),
    "v6e": Chip(32, 918e12, 1638e9, 1, "default", _2D, 8),
}


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice as rented: `name` (e.g. "v5e-16"), its chips and per-chip figures."""

    name: str
    generation: str
    chips: int
    topology: str  # libtpu's topology name, e.g. "v5e:4x4"

    @property
    def spec(self) -> Chip:
        return GENERATIONS[self.generation]

    @property
    def hbm_bytes(self) -> int:
        """HBM per chip (= per JAX device)."""
        return int(self.spec.hbm_gib * GIB)

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        per_host = min(self.chips, self.spec.chips_per_host)
        return {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 4, 1)}[per_host]


def known_slices(generation: str | None = None) -> list[str]:
    """Every slice name `slice_spec` accepts (of one generation, if given), smallest first."""
    return [
        f"{gen}-{chips * g.cores_per_chip}"
        for gen, g in GENERATIONS.items()
        if generation in (None, gen)
        for chips in g.shapes
    ]


def slice_spec(name: str) -> Slice:
    """The slice a user names, e.g. "v5e-16" (16 chips) or "v4-16" (16 TensorCores, 8 chips).

    Raises:
      ValueError: an unknown name; the message lists the known ones.
    """
    gen, _, count = name.strip().lower().partition("-")
    g = GENERATIONS.get(gen)
    chips = int(count) // g.cores_per_chip if g and count.isdigit() else 0
    if g is None or chips not in g.shapes or chips * g.cores_per_chip != int(count):
        raise ValueError(f"unknown TPU slice {name!r}; known: {', '.join(known_slices())}")
    return Slice(
        name=f"{gen}-{count}", generation=gen, chips=chips, topology=f"{gen}:{g.shapes[chips]}"
    )


def compiler_missing() -> str | None:
    """Why XLA:TPU cannot compile here (libtpu absent), or None when it can."""
    if importlib.util.find_spec("libtpu") is None:
        return "libtpu is not installed (pip install -e '.[tpu]')"
    return None


def compile_devices(s: Slice) -> list[Any]:
    """Abstract devices of the slice, for compiling (never running) with XLA:TPU.

    Raises:
      RuntimeError: libtpu is missing or refuses the topology (the message says which).
    """
    missing = compiler_missing()
    if missing:
        raise RuntimeError(f"cannot compile for {s.name}: {missing}")
    return _topology_devices(s)


@functools.cache
def _topology_devices(s: Slice) -> list[Any]:
    """The same device objects on every call, so that meshes over them compare equal."""
    # libtpu takes a machine-wide lock when it loads; compiling needs no TPU, so several
    # processes (a run, the tests) may hold it at once. The two TPU_* variables stand in for
    # the metadata server a TPU VM has, which libtpu otherwise warns about.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", s.name)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(
            platform="tpu",
            topology_name=s.topology,
            chip_config_name=s.spec.chip_config,
            chips_per_host_bounds=s.chips_per_host_bounds,
            num_slices=1,
        )
    except Exception as err:  # jax raises its runtime's own error types here
        raise RuntimeError(f"libtpu gives no topology {s.topology}: {err}") from None
    devices = list(topo.devices)
    if len(devices) != s.chips:
        raise RuntimeError(f"topology {s.topology} has {len(devices)} devices, not {s.chips}")
    return devices


def default_mesh(s: Slice, num_kv_heads: int, batch_prompts: int) -> tuple[int, int]:
    """A data x model mesh for a model on the slice.

    The sampler keeps its weights whole on every data shard, so a larger model axis holds less
    of them per chip; but once it exceeds the kv heads, every kv head (and its share of the KV
    cache) is copied. So: the largest model axis that divides both the chips and the kv heads,
    with a data axis that divides the prompt batch (the sampler prefills each prompt on one data
    shard).
    """
    for m in range(math.gcd(s.chips, num_kv_heads), 0, -1):
        if s.chips % m == 0 and num_kv_heads % m == 0 and batch_prompts % (s.chips // m) == 0:
            return s.chips // m, m
    raise ValueError(
        f"no mesh of {s.name} ({s.chips} chips) splits data.batch_prompts={batch_prompts} over "
        f"its data axis with whole kv heads ({num_kv_heads}) per chip; pass --mesh DxM"
    )


def roofline_seconds(s: Slice, flops: float, bytes_accessed: float) -> float:
    """Seconds per device at the chip's peak: the larger of compute time and HBM traffic time."""
    return max(flops / s.spec.peak_flops, bytes_accessed / s.spec.hbm_bandwidth, 0.0)
