"""Ahead-of-time memory plan: does a config fit a TPU slice, per device, before renting it?

    python -m ttrl_jax.plan --config configs/qwen2.5-math-7b_aime24.yaml --mesh 2x4 --tpu v4

The sampler and the train step are compiled for abstract inputs (shapes and shardings only: no
weights, no accelerator; `main` fakes D×M CPU devices) and measured per device:

- params, optimizer state and reference params: exact, from shapes and shardings; the KV cache
  from its shapes and the layout the partitioner gives it (`kv_cache_bytes`);
- activations / temporaries: XLA's buffer assignment of the compiled program
  (`compiled.memory_analysis()`; for an SPMD program every figure is per device).

A TTRL step has two phases and both must fit. Sampling: the train state stays resident while
the sampler runs on params resharded to the sample layout (a separate copy unless the mesh has
one data shard), with the prompt and response KV cache. Training: the donated state, the
reference params, the rollout batch and the step's temporaries (activations, gradients and
their accumulator, the optimizer update). The micro-batch (optim.micro_batch_size rows) bounds
the train step's activations; the plan suggests the largest one that fits.

It is an estimate: XLA:CPU stands in for the TPU compiler, which fuses, pads layouts to tiles
and rematerialises differently, so temporaries can differ either way; hence the headroom.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ttrl_jax import config as config_lib
from ttrl_jax import model as model_lib
from ttrl_jax import parts as parts_lib
from ttrl_jax import sampler as sampler_lib
from ttrl_jax import sharding as sharding_lib
from ttrl_jax import train as train_lib
from ttrl_jax import weights

GIB = 2**30

# HBM per chip (one JAX device per chip; v4 and v5p join their two TensorCores as one device).
# Source: the Cloud TPU system-architecture pages, cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}
# ("HBM capacity per chip": 32, 16, 95 and 32). The pages write GB; they are read here as
# GiB, and the headroom below covers the 7 % between the two readings.
HBM_GIB: dict[str, float] = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}

# The share of HBM the plan does not promise: the TPU runtime reserves some, allocations
# fragment, and XLA:TPU's temporaries differ from XLA:CPU's.
DEFAULT_HEADROOM = 0.10

# Hub ids whose config.json matches a preset in every field that sets a tensor shape (vocab,
# layers, widths, heads, biases, norms, tied embeddings); memory depends on nothing else.
SAME_SHAPES_AS = {
    "meta-llama/Llama-3.1-8B-Instruct": "meta-llama/Llama-3.1-8B",  # differs in eos ids only
    "Qwen/Qwen2.5-7B": "Qwen/Qwen2.5-Math-7B",  # differs in rope_theta and context length
}

SEARCHES = ("linear", "all", "none")

CAVEAT = (
    "Estimate. Params, optimizer state and KV cache follow from shapes and shardings; "
    "activations / temporaries come from XLA:CPU compiling for fake devices, and the TPU "
    "compiler fuses, pads layouts and rematerialises differently, so they can differ either "
    "way (compute dtype as in model.dtype, e.g. bfloat16 on TPU; XLA:CPU keeps some bfloat16 "
    "work, such as the sampler's per-layer weight copies, in float32). The eval sampler is "
    "not planned: it is smaller than the rollout sampler whenever eval.k <= sample.n_vote."
)


# ----------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class Program:
    """Per-device bytes of one compiled program, from `compiled.memory_analysis()`."""

    argument: int
    output: int
    alias: int  # outputs that reuse a donated argument's buffer
    temp: int
    code: int
    compile_s: float

    @property
    def total(self) -> int:
        return self.argument + self.output - self.alias + self.temp + self.code


@dataclasses.dataclass(frozen=True)
class MicroBatchFit:
    """Train-phase total of one micro-batch size, compiled or linearly interpolated."""

    rows: int
    train_total: int
    compiled: bool


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The batch the plan compiles for."""

    prompts: int  # P = data.batch_prompts
    n_vote: int  # N
    n_train: int
    prompt_len: int  # T: the bucket that holds data.max_prompt_tokens
    response_len: int  # G = sample.max_new_tokens
    mini_batch_rows: int
    micro_batch_rows: int  # as configured (the whole mini-batch when unset)
    prompt_chunk: int = 0  # prompts per sampling pass (0 = all)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device memory of both phases of a TTRL step on one mesh, and the verdict."""

    config: str
    model: str
    n_params: int
    mesh: tuple[int, int]
    tpu: str
    hbm_bytes: int
    headroom: float
    shapes: Shapes
    sample: dict[str, int]  # category -> per-device bytes; the categories sum to the total
    train: dict[str, int]
    sample_program: Program
    train_program: Program
    micro_batches: tuple[MicroBatchFit, ...]  # descending rows; empty when not searched
    search: str
    remat: bool  # block activations recomputed in the backward pass (ModelConfig.remat)

    @property
    def usable_bytes(self) -> int:
        return int(self.hbm_bytes * (1 - self.headroom))

    @property
    def sample_total(self) -> int:
        return sum(self.sample.values())

    @property
    def train_total(self) -> int:
        return sum(self.train.values())

    @property
    def peak(self) -> int:
        return max(self.sample_total, self.train_total)

    @property
    def fits(self) -> bool:
        return self.peak <= self.usable_bytes

    @property
    def suggested_micro_batch(self) -> int | None:
        """The largest optim.micro_batch_size whose step fits (None: none does, or no search)."""
        if self.sample_total > self.usable_bytes:
            return None
        fitting = [m.rows for m in self.micro_batches if m.train_total <= self.usable_bytes]
        return max(fitting, default=None)


# ----------------------------------------------------------------------------- inputs


def hbm_bytes(tpu: str) -> int:
    """HBM per chip of a TPU generation, in bytes."""
    if tpu not in HBM_GIB:
        raise ValueError(f"unknown TPU {tpu!r}; known: {', '.join(HBM_GIB)} (or pass --hbm-gib)")
    return int(HBM_GIB[tpu] * GIB)


def model_config(cfg: config_lib.Config) -> model_lib.ModelConfig:
    """The ModelConfig of `cfg.model` from a preset, a local folder's config.json or a GGUF
    file's metadata (no network).

    Raises:
      ValueError: the model is a hub id that is no known preset; plan then needs a local folder
        holding its config.json.
    """
    name = config_lib.resolve_model_path(cfg.model.name_or_path)
    dtypes = dict(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, remat=cfg.model.remat)
    preset = SAME_SHAPES_AS.get(name, name)
    if preset in model_lib.PRESETS_HF:
        return model_lib.preset(preset, **dtypes)
    folder = Path(name).expanduser()
    if folder.is_dir():
        return model_lib.ModelConfig.from_hf(weights.read_hf_config(folder), **dtypes)
    if folder.suffix == ".gguf":  # its metadata alone, no conversion
        from ttrl_jax import gguf

        return gguf.model_config(folder, **dtypes)
    known = sorted([*model_lib.PRESETS_HF, *SAME_SHAPES_AS])
    raise ValueError(
        f"model.name_or_path={cfg.model.name_or_path!r} is neither a local folder nor a known "
        f"preset ({', '.join(known)}); plan reads no network: download its config.json "
        f"(`hf download {name} config.json --local-dir DIR`) and pass model.name_or_path=DIR"
    )


def prompt_length(cfg: config_lib.Config) -> int:
    """The padded length of the longest allowed prompt: the smallest bucket that holds it."""
    fitting = [b for b in cfg.sample.prompt_buckets if b >= cfg.data.max_prompt_tokens]
    if not fitting:
        raise config_lib.ConfigError(
            f"no sample.prompt_buckets entry holds data.max_prompt_tokens="
            f"{cfg.data.max_prompt_tokens}; add a bucket >= {cfg.data.max_prompt_tokens}"
        )
    return min(fitting)


def micro_batch_candidates(mini_batch_rows: int, data_axis: int) -> list[int]:
    """optim.micro_batch_size values the step accepts, descending: divisors of the mini-batch
    rows that split evenly over the data axis."""
    return [
        r for r in range(mini_batch_rows, 0, -1) if mini_batch_rows % r == 0 and r % data_axis == 0
    ]


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def _abstract(shapes: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )


def _replicated_like(tree: Any, mesh: Mesh) -> Any:
    rep = sharding_lib.replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), tree)


def _key(mesh: Mesh) -> jax.ShapeDtypeStruct:
    key = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding_lib.replicated(mesh))


def _compile(jitted, *args) -> Program:
    t0 = time.perf_counter()
    stats = jitted.lower(*args).compile().memory_analysis()
    seconds = time.perf_counter() - t0
    if stats is None:
        raise RuntimeError(f"the {jax.default_backend()} backend gives no memory analysis")
    return Program(
        argument=int(stats.argument_size_in_bytes),
        output=int(stats.output_size_in_bytes),
        alias=int(stats.alias_size_in_bytes),
        temp=int(stats.temp_size_in_bytes),
        code=int(stats.generated_code_size_in_bytes),
        compile_s=seconds,
    )


# ----------------------------------------------------------------------------- programs


def params_abstract(mcfg: model_lib.ModelConfig, mesh: Mesh, rules: sharding_lib.Rules) -> Any:
    """The params as sharded ShapeDtypeStructs under one rules table."""
    shapes = jax.eval_shape(lambda: model_lib.init_params(mcfg, jax.random.key(0)))
    return _abstract(shapes, sharding_lib.param_shardings(mcfg, mesh, rules))


def kv_cache_bytes(mcfg: model_lib.ModelConfig, shapes: Shapes, mesh: Mesh) -> int:
    """Per-device bytes of the sampler's caches: the P prompts' keys and values (shared by their
    N samples) and the P·N responses' own, in the compute dtype; of one pass's prompts when
    the sampler runs in passes (sample.prompt_chunk).

    Every dimension is split as the sample rules map it, except kv heads that do not divide the
    model axis: the rules replicate them, but the partitioner keeps on each device only the kv
    heads its query heads read, K / gcd(K, M) of them (checked against the compiled sampler's
    loop buffers: Qwen2.5-1.5B's 2 kv heads on a model axis of 4 hold 1 per device).
    """
    L, K, H = mcfg.num_layers, mcfg.num_kv_heads, mcfg.head_dim
    P, T = min(shapes.prompt_chunk or shapes.prompts, shapes.prompts), shapes.prompt_len
    B, S = P * shapes.n_vote, max(shapes.response_len - 1, 1)  # the last token is never fed

    def split(name: str) -> int:
        axis = sharding_lib.mesh_axes_for((name,), sharding_lib.SAMPLE_RULES)[0]
        return 1 if axis is None else mesh.shape[axis]

    per_device = lambda dim, name: -(-dim // split(name))
    k_local = K // math.gcd(K, split("kv_heads"))
    cached = per_device(P, "batch") * per_device(T, "cache_seq") + per_device(
        B, "batch"
    ) * per_device(S, "cache_seq")
    local = per_device(L, "layers") * cached * k_local * per_device(H, "head_dim")
    return 2 * local * jnp.dtype(mcfg.dtype).itemsize  # keys and values


def compile_sampler(
    cfg: config_lib.Config, mcfg: model_lib.ModelConfig, shapes: Shapes, mesh: Mesh
) -> Program:
    """Compiles the rollout sampler (params in the sample layout)."""
    params = params_abstract(mcfg, mesh, sharding_lib.SAMPLE_RULES)
    rows = sharding_lib.batch_sharding(mesh, 2, sharding_lib.SAMPLE_RULES)
    P, T = shapes.prompts, shapes.prompt_len
    stop_ids = parts_lib.stop_ids(mcfg, cfg.sample.stop_token_ids)
    fn = sampler_lib.compiled_sampler(
        mcfg, shapes.n_vote, shapes.response_len, stop_ids, 0, mesh, shapes.prompt_chunk
    )
    return _compile(
        fn,
        params,
        jax.ShapeDtypeStruct((P, T), jnp.int32, sharding=rows),
        jax.ShapeDtypeStruct((P, T), jnp.bool_, sharding=rows),
        _key(mesh),
        _replicated_like(jax.eval_shape(sampler_lib.SamplingParams.make), mesh),
    )


@dataclasses.dataclass(frozen=True)
class TrainInputs:
    """The train step's arguments as sharded ShapeDtypeStructs."""

    state: train_lib.TrainState
    ref_params: Any  # None without KL
    batch: train_lib.StepBatch


def train_inputs(
    cfg: config_lib.Config, mcfg: model_lib.ModelConfig, shapes: Shapes, mesh: Mesh, tx
) -> TrainInputs:
    """The train step's state, reference params and rollout batch as sharded abstract values."""
    params = jax.eval_shape(lambda: model_lib.init_params(mcfg, jax.random.key(0)))
    state_shapes = jax.eval_shape(lambda p: train_lib.init_state(p, tx), params)
    state_sh = train_lib.state_shardings(mcfg, tx, mesh)
    state = _abstract(state_shapes, state_sh)
    ref = state.params if cfg.optim.kl_coef > 0 else None
    P, N, T, R = shapes.prompts, shapes.n_vote, shapes.prompt_len, shapes.response_len

    def rows(shape, dtype):
        sh = sharding_lib.batch_sharding(mesh, len(shape), sharding_lib.TRAIN_RULES)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)

    batch = train_lib.StepBatch(
        prompt_PT=rows((P, T), jnp.int32),
        prompt_mask_PT=rows((P, T), jnp.bool_),
        response_PNR=rows((P, N, R), jnp.int32),
        response_mask_PNR=rows((P, N, R), jnp.bool_),
        logp_PNR=rows((P, N, R), jnp.float32),
        entropy_PNR=rows((P, N, R), jnp.float32),
        answer_id_PN=rows((P, N), jnp.int32),
        gold_id_P=rows((P,), jnp.int32),
    )
    return TrainInputs(state=state, ref_params=ref, batch=batch)


def compile_train_step(
    cfg: config_lib.Config,
    mcfg: model_lib.ModelConfig,
    shapes: Shapes,
    mesh: Mesh,
    micro_batch_rows: int,
) -> Program:
    """Compiles the train step for one micro-batch size."""
    # The schedule's length changes no shape: any step count compiles the same program.
    parts = parts_lib.train_parts(cfg, total_steps=1000, micro_batch_rows=micro_batch_rows)
    inputs = train_inputs(cfg, mcfg, shapes, mesh, parts.tx)
    state_sh = jax.tree.map(lambda x: x.sharding, inputs.state)
    ref_sh = None if inputs.ref_params is None else state_sh.params
    step = train_lib.build_train_step(
        mcfg, parts.step_cfg, parts.tx, parts.lr_fn, mesh, state_sh, ref_sh
    )
    hyper = _replicated_like(jax.eval_shape(train_lib.StepHyper.make), mesh)
    return _compile(step, inputs.state, inputs.ref_params, inputs.batch, _key(mesh), hyper)


# ----------------------------------------------------------------------------- the plan

# Programs measured so far, by (kind, config, architecture, shapes, mesh[, rows]). jit's own
# cache misses across plans (every build makes a new optimizer, so a new function), and a
# full-size compile takes minutes.
_PROGRAMS: dict[tuple, Program] = {}


def _cached(key: tuple, build, log, what: str) -> Program:
    if key not in _PROGRAMS:
        log(f"compiling {what} ...")
        _PROGRAMS[key] = build()
        log(f"  {_PROGRAMS[key].compile_s:.0f} s")
    return _PROGRAMS[key]


def plan_shapes(cfg: config_lib.Config) -> Shapes:
    """The batch a config's step runs on, at its largest prompt bucket."""
    mini_rows = cfg.optim.mini_batch_prompts * cfg.sample.n_train
    return Shapes(
        prompts=cfg.data.batch_prompts,
        n_vote=cfg.sample.n_vote,
        n_train=cfg.sample.n_train,
        prompt_len=prompt_length(cfg),
        response_len=cfg.sample.max_new_tokens,
        mini_batch_rows=mini_rows,
        micro_batch_rows=cfg.optim.micro_batch_size or mini_rows,
        prompt_chunk=cfg.sample.prompt_chunk,
    )


def exact_bytes(
    cfg: config_lib.Config, mcfg: model_lib.ModelConfig, shapes: Shapes, mesh: Mesh
) -> dict[str, int]:
    """Per-device bytes that follow from shapes and shardings alone.

    Returns:
      dict with "params", "optimizer state" (train layout), "reference params (KL)" (0 without
      KL), "sampler params" (the copy resharded to the sample layout; 0 when both layouts
      coincide, as with one data shard), "rollout batch" (the train step's input) and
      "KV cache" (the sampler's).
    """
    inputs = train_inputs(cfg, mcfg, shapes, mesh, parts_lib.optimizer(cfg.optim, 1000)[0])
    sample_params = params_abstract(mcfg, mesh, sharding_lib.SAMPLE_RULES)
    same_layout = all(
        a.sharding.is_equivalent_to(b.sharding, len(a.shape))
        for a, b in zip(jax.tree.leaves(inputs.state.params), jax.tree.leaves(sample_params))
    )
    return {
        "params": shard_bytes(inputs.state.params),
        "optimizer state": shard_bytes(inputs.state.opt_state) + shard_bytes(inputs.state.step),
        "reference params (KL)": shard_bytes(inputs.ref_params),
        "sampler params": 0 if same_layout else shard_bytes(sample_params),
        "rollout batch": shard_bytes(inputs.batch),
        "KV cache": kv_cache_bytes(mcfg, shapes, mesh),
    }


def make_plan(
    cfg: config_lib.Config,
    mesh_spec: str | tuple[int, int],
    tpu: str = "v4",
    *,
    devices: Sequence[Any] | None = None,
    hbm: int | None = None,
    headroom: float = DEFAULT_HEADROOM,
    search: str = "linear",
    model_cfg: model_lib.ModelConfig | None = None,
    config_name: str = "",
    log: Any = None,
) -> Plan:
    """Compiles the sampler and the train step for `cfg` on a mesh and measures them per device.

    Args:
      cfg: the run config (its batch, sampling and optimizer settings set the shapes).
      mesh_spec: "DxM" or (D, M); D×M must equal the number of `devices`.
      tpu: TPU generation for the HBM size (HBM_GIB), e.g. "v5e".
      devices: devices to build the mesh on (default: all; fake CPU devices in `main`).
      hbm: HBM per device in bytes; overrides `tpu`'s.
      headroom: fraction of HBM left unplanned (runtime reserve, fragmentation, compiler).
      search: micro-batch search: "linear" (compile the largest candidate; if it does not fit,
        also the smallest, interpolate linearly between the two and confirm the pick by
        compiling it), "all" (compile every candidate) or "none".
      model_cfg: the architecture (default: from cfg.model via `model_config`).
      config_name: a label for reports (e.g. the YAML file name).
      log: optional callable taking progress strings.

    Returns:
      The Plan.

    Raises:
      ValueError: a mesh that does not match the devices or does not divide a dimension
        (from the sharding module), an unknown TPU, or a model plan cannot resolve offline.
      ConfigError: batch sizes that do not split over the mesh's data axis.
    """
    if search not in SEARCHES:
        raise ValueError(f"unknown search {search!r}; choose one of {SEARCHES}")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom={headroom} must be in [0, 1)")
    hbm = hbm_bytes(tpu) if hbm is None else int(hbm)
    log = log or (lambda _: None)
    mesh = sharding_lib.make_mesh(mesh_spec, devices)  # names a device-count mismatch
    D, M = mesh.shape["data"], mesh.shape["model"]
    config_lib.validate_config(cfg, data_axis_size=D)
    if cfg.data.batch_prompts % D:
        raise config_lib.ConfigError(
            f"data.batch_prompts={cfg.data.batch_prompts} prompts do not split over the mesh's "
            f"data axis ({D}): the sampler prefills each prompt on one data shard; choose a "
            f"mesh whose data size divides {cfg.data.batch_prompts}"
        )
    mcfg = model_cfg or model_config(cfg)
    shapes = plan_shapes(cfg)
    exact = exact_bytes(cfg, mcfg, shapes, mesh)  # also raises the sharding module's errors
    resident = {k: exact[k] for k in ("params", "optimizer state", "reference params (KL)")}

    sample_prog = _cached(
        ("sampler", cfg, mcfg, shapes, mesh),
        lambda: compile_sampler(cfg, mcfg, shapes, mesh),
        log,
        f"the sampler ({mcfg.num_layers} layers, mesh {D}x{M})",
    )
    sample_params = shard_bytes(params_abstract(mcfg, mesh, sharding_lib.SAMPLE_RULES))
    kv = min(exact["KV cache"], sample_prog.temp)  # the caches are temporaries of the sampler
    sample = {
        **resident,
        "sampler params": exact["sampler params"],
        "KV cache": kv,
        "activations / temporaries": sample_prog.temp - kv,
        # Prompts and the rollout it returns (the params argument is counted above).
        "batch and outputs": max(sample_prog.argument - sample_params, 0)
        + sample_prog.output
        - sample_prog.alias
        + sample_prog.code,
    }

    def train_program(rows: int) -> Program:
        return _cached(
            ("train", cfg, mcfg, shapes, mesh, rows),
            lambda: compile_train_step(cfg, mcfg, shapes, mesh, rows),
            log,
            f"the train step (micro-batch {rows} rows, mesh {D}x{M})",
        )

    def train_rows(prog: Program) -> dict[str, int]:
        return {
            **resident,
            "sampler params": 0,
            "KV cache": 0,
            "activations / temporaries": prog.temp,  # with gradients and the update
            # The whole rollout batch: jit leaves unused arguments (the rollout log-probs when
            # they are recomputed) out of the program, but the caller still holds them. Plus
            # outputs that do not reuse the donated state (the metrics; the whole new state if
            # donation were refused).
            "batch and outputs": exact["rollout batch"] + prog.output - prog.alias + prog.code,
        }

    train_prog = train_program(shapes.micro_batch_rows)
    train = train_rows(train_prog)
    usable = int(hbm * (1 - headroom))
    candidates = micro_batch_candidates(shapes.mini_batch_rows, D)
    micro = search_micro_batches(
        candidates, search, usable, lambda r: sum(train_rows(train_program(r)).values())
    )
    return Plan(
        config=config_name,
        model=cfg.model.name_or_path,
        n_params=n_params(mcfg),
        mesh=(D, M),
        tpu=tpu,
        hbm_bytes=hbm,
        headroom=headroom,
        shapes=shapes,
        sample=sample,
        train=train,
        sample_program=sample_prog,
        train_program=train_prog,
        micro_batches=tuple(micro),
        search=search,
        remat=mcfg.remat,
    )


def n_params(mcfg: model_lib.ModelConfig) -> int:
    return model_lib.count_params(
        jax.eval_shape(lambda: model_lib.init_params(mcfg, jax.random.key(0)))
    )


def search_micro_batches(
    candidates: Sequence[int], search: str, usable: int, train_total
) -> list[MicroBatchFit]:
    """Train-phase totals of micro-batch sizes, as the search strategy finds them.

    Args:
      candidates: micro-batch rows, descending.
      search: "linear", "all" or "none" (see `make_plan`).
      usable: bytes per device a step may use.
      train_total: rows -> per-device bytes of the train step compiled for that micro-batch.

    Returns:
      MicroBatchFit per candidate looked at, descending rows.
    """
    if search == "none" or not candidates:
        return []

    def compiled(rows):
        return MicroBatchFit(rows, train_total(rows), compiled=True)

    if search == "all":
        return [compiled(r) for r in candidates]
    largest = compiled(candidates[0])
    if largest.train_total <= usable or len(candidates) == 1:
        return [largest]
    smallest = compiled(candidates[-1])
    if smallest.train_total > usable:
        return [largest, smallest]
    # Activations grow about linearly with the micro-batch rows; the rest is fixed.
    hi, lo = largest, smallest
    slope = (hi.train_total - lo.train_total) / (hi.rows - lo.rows)
    found = {hi.rows: hi, lo.rows: lo}
    for rows in candidates[1:-1]:
        found[rows] = MicroBatchFit(rows, int(lo.train_total + slope * (rows - lo.rows)), False)
    # Confirm the interpolated pick by compiling it; step down while it does not fit.
    for rows in candidates[1:-1]:
        if found[rows].train_total <= usable:
            found[rows] = compiled(rows)
            if found[rows].train_total <= usable:
                break
    return [found[r] for r in candidates]


# ----------------------------------------------------------------------------- reports


def gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _remat_note(plan: Plan) -> str:
    return "on (--remat: ModelConfig.remat=True)" if plan.remat else "off"


def _verdict(plan: Plan) -> str:
    used = f"{gib(plan.peak)} GiB of {gib(plan.usable_bytes)} GiB usable"
    return ("fits" if plan.fits else "does NOT fit") + f" ({used})"


def _micro_lines(plan: Plan) -> list[str]:
    if not plan.micro_batches:
        return ["micro-batch search: off"]
    usable = plan.usable_bytes
    lines = ["micro-batch (optim.micro_batch_size rows): train-phase total per device"]
    for m in plan.micro_batches:
        how = "compiled" if m.compiled else "interpolated"
        mark = "fits" if m.train_total <= usable else "too big"
        lines.append(f"  {m.rows:>5} rows  {gib(m.train_total):>8} GiB  {mark} ({how})")
    return [*lines, f"suggestion: {_suggestion(plan)}"]


def _suggestion(plan: Plan) -> str:
    best = plan.suggested_micro_batch
    if not plan.micro_batches:
        return "none (micro-batch search off)"
    if plan.sample_total > plan.usable_bytes:
        return (
            "sampling alone does not fit, so no micro-batch helps: lower sample.n_vote, "
            "data.batch_prompts or sample.max_new_tokens, or use more chips"
        )
    if best is None:
        return (
            "no micro-batch fits: the params, optimizer state and gradients need more chips "
            "(a larger mesh) or a TPU with more HBM"
        )
    return f"optim.micro_batch_size={best}"


def format_text(plan: Plan) -> str:
    """A plain-text report of one plan."""
    s, D, M = plan.shapes, *plan.mesh
    n = plan.n_params
    count = f"{n / 1e9:.2f} B" if n >= 10**8 else f"{n:,}"
    out = [
        f"plan: {plan.config or plan.model}  model {plan.model} ({count} params)",
        f"mesh {D}x{M} ({D * M} devices) on {plan.tpu}: {gib(plan.hbm_bytes)} GiB HBM per device, "
        f"{plan.headroom:.0%} headroom",
        f"activation rematerialisation: {_remat_note(plan)}",
        f"batch: {s.prompts} prompts x {s.n_vote} samples, prompt {s.prompt_len} + response "
        f"{s.response_len} tokens; train {s.n_train} per prompt, mini-batch {s.mini_batch_rows} "
        f"rows, micro-batch {s.micro_batch_rows} rows",
        "",
        f"{'per device (GiB)':<28}{'sampling':>10}{'training':>10}",
    ]
    for name in plan.sample:
        out.append(f"{name:<28}{gib(plan.sample[name]):>10}{gib(plan.train[name]):>10}")
    out.append(f"{'total':<28}{gib(plan.sample_total):>10}{gib(plan.train_total):>10}")
    out += [
        "",
        f"verdict: {_verdict(plan)}",
        *_micro_lines(plan),
        f"compile time: sampler {plan.sample_program.compile_s:.0f} s, train step "
        f"{plan.train_program.compile_s:.0f} s",
        "",
        CAVEAT,
    ]
    return "\n".join(out)


def format_markdown(plan: Plan) -> str:
    """A README-ready markdown table of one plan's per-device memory."""
    D, M = plan.mesh
    out = [
        f"**{plan.model}** on {plan.tpu} ({D}x{M} mesh, {gib(plan.hbm_bytes)} GiB HBM per "
        f"device; rematerialisation {_remat_note(plan)}), per device:",
        "",
        "| GiB per device | sampling | training |",
        "|---|---:|---:|",
    ]
    for name in plan.sample:
        out.append(f"| {name} | {gib(plan.sample[name])} | {gib(plan.train[name])} |")
    out.append(f"| **total** | **{gib(plan.sample_total)}** | **{gib(plan.train_total)}** |")
    tried = ", ".join(
        f"{m.rows} rows {gib(m.train_total)} GiB ({'compiled' if m.compiled else 'interpolated'})"
        for m in plan.micro_batches
    )
    out += [
        "",
        f"Verdict as configured (micro-batch {plan.shapes.micro_batch_rows} rows): "
        f"{_verdict(plan)}.",
        f"Training total by micro-batch: {tried or 'not searched'}.",
        f"Suggestion: {_suggestion(plan)}.",
        "",
        f"_{CAVEAT}_",
    ]
    return "\n".join(out)


def summary_markdown(plans: Sequence[Plan]) -> str:
    """One markdown row per plan: the per-device peak of each category and the verdict."""
    out = [
        "| model | TPU | mesh | params | opt. state | ref. params | KV cache | activations "
        "(sample / train) | total (sample / train) | HBM usable | fits as configured | largest "
        "micro-batch that fits |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for p in plans:
        D, M = p.mesh
        act = "activations / temporaries"
        best = p.suggested_micro_batch
        name = p.model + (" (remat)" if p.remat else "")
        out.append(
            f"| {name} | {p.tpu}-{_chips_name(p.tpu, D * M)} | {D}x{M} | "
            f"{gib(p.sample['params'])} | {gib(p.sample['optimizer state'])} | "
            f"{gib(p.sample['reference params (KL)'])} | {gib(p.sample['KV cache'])} | "
            f"{gib(p.sample[act])} / {gib(p.train[act])} | "
            f"{gib(p.sample_total)} / {gib(p.train_total)} | {gib(p.usable_bytes)} | "
            f"{'yes' if p.fits else 'no'} | {best if best is not None else '-'} |"
        )
    out += ["", f"GiB per device. _{CAVEAT}_"]
    return "\n".join(out)


def _chips_name(tpu: str, chips: int) -> str:
    """The accelerator-type suffix: v4 and v5p count TensorCores (2 per chip), v5e/v6e chips."""
    return str(chips * 2 if tpu in ("v4", "v5p") else chips)


# ----------------------------------------------------------------------------- command line


def _parse_target(text: str, default_tpu: str) -> tuple[str, str]:
    """'2x4' or 'v5e:4x4' -> (tpu, mesh)."""
    tpu, sep, mesh = text.rpartition(":")
    return (tpu if sep else default_tpu), mesh


def use_fake_cpu_devices(count: int) -> None:
    """Asks for `count` CPU devices; effective only before JAX initialises its backend."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        flag = f"--xla_force_host_platform_device_count={count}"
        os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


def main(argv: Sequence[str] | None = None) -> list[Plan]:
    """Command line: plans one or more configs on one or more meshes and prints the reports."""
    ap = argparse.ArgumentParser(
        prog="python -m ttrl_jax.plan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", action="append", required=True, help="YAML run config (repeatable)")
    ap.add_argument(
        "--mesh",
        action="append",
        required=True,
        help="DxM (data x model), or TPU:DxM such as v5e:4x4 (repeatable)",
    )
    ap.add_argument("--tpu", default="v4", choices=sorted(HBM_GIB), help="TPU generation")
    ap.add_argument("--hbm-gib", type=float, default=None, help="HBM per device; overrides --tpu")
    ap.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM, help="HBM left unplanned")
    ap.add_argument("--search", default="linear", choices=SEARCHES, help="micro-batch search")
    ap.add_argument(
        "--remat",
        action="store_true",
        help="plan with rematerialisation on (as model.remat=true: block activations "
        "recomputed in the backward pass), e.g. to see whether it would make a config fit",
    )
    ap.add_argument("--markdown", action="store_true", help="print README-ready markdown tables")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. sample.n_vote=32")
    args = ap.parse_args(argv)

    targets = [_parse_target(t, args.tpu) for t in args.mesh]
    if any(m == "auto" for _, m in targets):
        ap.error("--mesh auto has no meaning without devices; give DxM, e.g. --mesh 2x4")
    try:
        shapes = [sharding_lib.parse_mesh_shape(m) for _, m in targets]
    except ValueError as err:
        ap.error(str(err))
    for tpu, _ in targets:
        if tpu not in HBM_GIB:
            ap.error(f"unknown TPU {tpu!r} in --mesh; known: {', '.join(HBM_GIB)}")
    # Compile for fake CPU devices: set before JAX starts its backend (the first device query).
    use_fake_cpu_devices(max(d * m for d, m in shapes))
    available = jax.devices()
    hbm = None if args.hbm_gib is None else int(args.hbm_gib * GIB)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)

    plans = []
    for path in args.config:
        try:
            cfg = config_lib.load_config(path, args.overrides)
        except config_lib.ConfigError as err:
            raise SystemExit(str(err)) from None
        try:
            model_cfg = model_config(cfg)
            model_cfg = model_cfg.replace(remat=model_cfg.remat or args.remat)
        except ValueError as err:
            raise SystemExit(str(err)) from None
        for (tpu, _), (d, m) in zip(targets, shapes):
            if d * m > len(available):
                raise SystemExit(
                    f"mesh {d}x{m} needs {d * m} devices but JAX started with {len(available)} "
                    "(XLA_FLAGS already sets xla_force_host_platform_device_count); unset it"
                )
            try:
                plan = make_plan(
                    cfg, (d, m), tpu, devices=available[: d * m], hbm=hbm,
                    headroom=args.headroom, search=args.search, model_cfg=model_cfg,
                    config_name=Path(path).name, log=log,
                )  # fmt: skip
            except ValueError as err:  # ConfigError too: messages that name the fix
                raise SystemExit(f"plan {Path(path).name} on mesh {d}x{m}: {err}") from None
            plans.append(plan)
            print(format_markdown(plan) if args.markdown else format_text(plan), flush=True)
            print(flush=True)
    if len(plans) > 1:
        print(summary_markdown(plans) if args.markdown else _summary_text(plans))
    return plans


def _summary_text(plans: Sequence[Plan]) -> str:
    lines = ["summary (GiB per device: sampling / training peak, usable HBM):"]
    for p in plans:
        D, M = p.mesh
        best = p.suggested_micro_batch
        lines.append(
            f"  {p.model:<36} {p.tpu:<4} {D}x{M}  {gib(p.sample_total):>7} / "
            f"{gib(p.train_total):>7} of {gib(p.usable_bytes):>6}  "
            f"{'fits' if p.fits else 'does NOT fit'}; micro-batch {best or '-'}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
