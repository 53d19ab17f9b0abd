"""Ahead-of-time plan: does a config fit the TPU slice a user rents, and how long is a step?

    python -m ttrl_jax.plan --config configs/qwen2.5-math-7b_aime24.yaml --tpu v5e-16 [--json]

Both phases of a TTRL step are compiled by XLA:TPU for the slice's abstract devices (libtpu, no
TPU needed; see tpu.py), from shapes and shardings alone, exactly as a run builds them
(run/from_config.py):

- **sampling**: the rollout sampler, with the train state (params, optimizer state, reference
  params) resident as arguments it does not read, and its params resharded to the sample layout;
- **training**: the train step, its state donated, with the rollout batch.

Per device, each phase's total is the compiler's memory analysis of that program (arguments +
outputs not aliased to a donated argument + temporaries + code). The compiler is given the
usable HBM (the chip's HBM less the headroom) as its limit, so "fits" means it compiled within
it; a program it refuses is reported with the figure from its out-of-memory message. When a
phase does not fit as configured, the plan searches what a config can change (`KNOBS`): the
micro-batch (optim.micro_batch_size), rematerialisation (model.remat) and any other knob the
config has, each a parameter of the compiled programs; it reports the largest micro-batch that
fits. Seconds per phase come from the compiler's cost analysis (timing.py).

Without libtpu the programs are compiled by XLA:CPU for fake devices instead, and the report
says so: XLA:CPU lays out, fuses and rematerialises differently, so its temporaries are only an
indication.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import Mesh

from ttrl_jax import sharding as sharding_lib
from ttrl_jax.config import load as config_lib
from ttrl_jax.config.schema import Config, ConfigError
from ttrl_jax.model.config import REMAT_POLICIES, ModelConfig
from ttrl_jax.plan import programs
from ttrl_jax.plan import timing as plan_time
from ttrl_jax.plan import tpu as tpu_lib
from ttrl_jax.plan.programs import Shapes, has_key, model_config, model_settings, plan_shapes

GIB = tpu_lib.GIB

# The share of HBM the plan does not promise: the runtime's own buffers, the host transfers
# around a step, and a margin for the compiler choosing differently with the whole HBM.
DEFAULT_HEADROOM = 0.05

# What the plan may change in a config to make a phase fit, as config keys, in the order tried.
# A knob whose key the config does not have is skipped.
KNOBS = ("sample.prompt_chunk", "model.remat", "optim.micro_batch_size")


# ----------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class Memory:
    """Per-device bytes of one compiled program, or the compiler's refusal."""

    argument: int = 0
    output: int = 0
    alias: int = 0  # outputs that reuse a donated argument's buffer
    temp: int = 0
    code: int = 0
    compile_s: float = 0.0
    refused: str = ""  # the compiler's out-of-memory message; "" when it compiled
    needed: int | None = None  # bytes the refusal says the program needs, when it says

    @property
    def total(self) -> int | None:
        if self.refused:
            return self.needed
        return self.argument + self.output - self.alias + self.temp + self.code


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase of a step: its program and a per-device breakdown of its total."""

    memory: Memory
    parts: dict[str, int]  # category -> bytes; sums to the program's total when it compiled

    @property
    def total(self) -> int | None:
        return self.memory.total


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device memory and time of both phases of a TTRL step on one slice, and the verdict."""

    config: str
    model: str
    n_params: int
    trained_params: int  # n_params, or with LoRA (model.lora) the adapters'
    lora: dict[str, Any] | None  # the model.lora section when LoRA is on
    slice: tpu_lib.Slice
    mesh: tuple[int, int]
    compiler: str  # "tpu" or "cpu"
    compiler_note: str  # why the CPU stands in, when it does
    headroom: float
    shapes: Shapes
    settings: dict[str, Any]  # knob values planned with (the config's unless the search changed)
    changed: dict[str, Any]  # the knobs the search changed to make the config fit
    sample: Phase
    train: Phase
    micro_batches: dict[
        int, int | None
    ]  # rows -> train-phase total tried (None: refused, no figure)
    time: plan_time.Estimate | None

    @property
    def usable_bytes(self) -> int:
        return int(self.slice.hbm_bytes * (1 - self.headroom))

    @property
    def peak(self) -> int | None:
        totals = [self.sample.total, self.train.total]
        return None if None in totals else max(totals)

    @property
    def fits(self) -> bool:
        return self.peak is not None and self.peak <= self.usable_bytes

    @property
    def micro_batch(self) -> int | None:
        """The largest optim.micro_batch_size whose train step fits (None: none does)."""
        usable = self.usable_bytes
        fitting = [r for r, b in self.micro_batches.items() if b is not None and b <= usable]
        return max(fitting, default=None)


# ----------------------------------------------------------------------------- compiling

# Programs compiled so far, by what determines them. A full-size program takes minutes.
_MEMORY: dict[tuple, Memory] = {}
_OOM = re.compile(r"\(([\d.]+)([KMGT]?)\) exceeds available HBM|Used ([\d.]+)([KMGT]?) of")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def needed_bytes(message: str) -> int | None:
    """The bytes an XLA:TPU out-of-memory message says the program needs (None: not said)."""
    m = _OOM.search(message)
    if m is None:
        return None
    number, unit = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    return int(float(number) * _UNITS[unit])


def compiled_memory(jitted, args: Sequence[Any], limit: int | None) -> Memory:
    """Compiles `jitted` for `args` and reads the per-device memory analysis.

    Args:
      jitted: a jitted function.
      args: its arguments as sharded ShapeDtypeStructs.
      limit: HBM bytes the TPU compiler may use (None: the chip's); XLA:CPU has no limit.
    """
    with jax.default_matmul_precision("default"):  # as a run compiles, whatever the caller's
        lowered = jitted.lower(*args)
    tpu = next(iter(jax.tree.leaves(args)[0].sharding.device_set)).platform == "tpu"
    # The compiler plans within `limit` (it can only lower its own, never raise it) and refuses
    # a program that needs more.
    limit_mib = None if limit is None else max(limit // 2**20, 1)
    options = {"xla_tpu_max_hbm_size_mib": limit_mib} if tpu and limit_mib else {}
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile(compiler_options=options)
    except jax.errors.JaxRuntimeError as err:
        message = str(err)
        if "RESOURCE_EXHAUSTED" not in message:
            raise
        first = message.strip().splitlines()[0]
        return Memory(compile_s=time.perf_counter() - t0, refused=first, needed=needed_bytes(first))
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError(f"the {jax.default_backend()} compiler gives no memory analysis")
    return Memory(
        argument=int(stats.argument_size_in_bytes),
        output=int(stats.output_size_in_bytes),
        alias=int(stats.alias_size_in_bytes),
        temp=int(stats.temp_size_in_bytes),
        code=int(stats.generated_code_size_in_bytes),
        compile_s=time.perf_counter() - t0,
    )


def cached(key: tuple, build: Callable[[], Memory], log, what: str) -> Memory:
    if key not in _MEMORY:
        log(f"compiling {what} ...")
        _MEMORY[key] = build()
        m = _MEMORY[key]
        verdict = f"refused ({m.refused})" if m.refused else f"{m.total / GIB:.2f} GiB per device"
        log(f"  {m.compile_s:.0f} s: {verdict}")
    return _MEMORY[key]


# ----------------------------------------------------------------------------- the two phases


def sample_phase(cfg: Config, mcfg, mesh: Mesh, limit: int | None, log) -> Phase:
    """The rollout sampler compiled with the train state resident."""
    built = programs.sample_program(cfg, mcfg, mesh)
    kv = programs.kv_cache_bytes(mcfg, programs.plan_shapes(cfg), mesh)
    return _phase("the sampler", built, (cfg, mcfg, mesh), limit, log, kv)


def train_phase(cfg: Config, mcfg, mesh: Mesh, limit: int | None, log) -> Phase:
    """The train step compiled with its state donated, for cfg's micro-batch."""
    rows = cfg.optim.micro_batch_size or programs.plan_shapes(cfg).mini_batch_rows
    what = f"the train step (micro-batch {rows} rows, model.remat={cfg.model.remat})"
    built = programs.train_program(cfg, mcfg, mesh)
    return _phase(what, built, (cfg, mcfg, mesh), limit, log)


def _phase(what: str, built, key: tuple, limit: int | None, log, kv_cache: int = 0) -> Phase:
    memory = cached(
        (what, *key, limit), lambda: compiled_memory(built.jitted, built.args, limit), log, what
    )
    return Phase(memory, _with_program_parts(built.known, memory, kv_cache))


def _with_program_parts(known: dict[str, int], memory: Memory, kv_cache: int = 0) -> dict:
    """The argument bytes `known` by name, then the compiled program's other categories."""
    if memory.refused:
        return dict(known)
    kv = min(kv_cache, memory.temp)  # the caches are temporaries of the sampler
    parts = dict(known)
    if kv_cache:
        parts["KV cache"] = kv
    parts["temporaries"] = memory.temp - kv
    other_args = max(memory.argument - sum(known.values()), 0)
    parts["other inputs, outputs, code"] = other_args + memory.output - memory.alias + memory.code
    return parts


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the programs are compiled: the slice's devices and which compiler."""

    slice: tpu_lib.Slice
    devices: list[Any]
    compiler: str  # "tpu" or "cpu"
    note: str  # why XLA:CPU stands in, when it does


def target(s: tpu_lib.Slice, devices: Sequence[Any] | None = None) -> Target:
    """The slice's abstract TPU devices, or CPU devices when libtpu is missing (or `devices`)."""
    if devices is not None:
        cpu = devices[0].platform != "tpu"
        note = "XLA:CPU compiles for the CPU devices given, standing in for XLA:TPU" if cpu else ""
        return Target(s, list(devices), "cpu" if cpu else "tpu", note)
    try:
        return Target(s, tpu_lib.compile_devices(s), "tpu", "")
    except RuntimeError as err:
        reason = str(err)
    cpus = jax.devices("cpu")
    if len(cpus) < s.chips:
        raise ValueError(
            f"{reason}; the XLA:CPU fallback needs {s.chips} CPU devices but JAX started with "
            f"{len(cpus)} (XLA_FLAGS=--xla_force_host_platform_device_count={s.chips})"
        )
    return Target(s, cpus[: s.chips], "cpu", f"XLA:CPU stands in for XLA:TPU: {reason}")


def remat_choices(cfg: Config) -> list[Any]:
    """model.remat values from the configured one towards recomputing the most: keep everything,
    then the policies from the one that keeps most ("dots") to the one that keeps least."""
    ordered = [False, *reversed(list(REMAT_POLICIES))]
    configured = {True: "block", "none": False}.get(cfg.model.remat, cfg.model.remat)
    return ordered[ordered.index(configured) :]


def largest_fitting(
    candidates: Sequence[int], total: Callable[[int], int | None], usable: int
) -> int | None:
    """The largest candidate (descending list) whose compiled `total` fits in `usable`.

    The largest first (a config that fits as it is costs one compile), then the smallest (does
    any fit?); between them memory grows about linearly with the rows (activations), so the
    pick is read off the line through the two and confirmed by compiling it, stepping down
    while it does not fit. A refusal that gives no figure counts as the usable bytes plus one.
    """
    fits = lambda t: t is not None and t <= usable
    if not candidates:
        return None
    hi = total(candidates[0])
    if fits(hi) or len(candidates) == 1:
        return candidates[0] if fits(hi) else None
    lo = total(candidates[-1])
    if not fits(lo):
        return None
    big, small = candidates[0], candidates[-1]
    slope = ((usable + 1 if hi is None else hi) - lo) / (big - small)
    inner = [r for r in candidates[1:-1] if lo + slope * (r - small) <= usable]
    for rows in inner:
        if fits(total(rows)):
            return rows
    return small


def make_plan(
    cfg: Config,
    tpu: str = "v5e-16",
    mesh: str | tuple[int, int] | None = None,
    *,
    devices: Sequence[Any] | None = None,
    headroom: float = DEFAULT_HEADROOM,
    search: bool = True,
    estimate_time: bool = True,
    model_cfg: ModelConfig | None = None,
    config_name: str = "",
    log: Callable[[str], None] | None = None,
) -> Plan:
    """Compiles both phases of `cfg`'s step for a TPU slice and measures them per device.

    Args:
      cfg: the run config (its batch, sampling and optimizer settings set the shapes).
      tpu: the slice, e.g. "v5e-16" or "v4-8" (see `tpu.known_slices`).
      mesh: "DxM" or (D, M) with D·M = the slice's chips; None = `tpu.default_mesh`.
      devices: compile for these devices instead of the slice's (e.g. fake CPU devices).
      headroom: fraction of HBM left unplanned.
      search: when a phase does not fit as configured, try the KNOBS the config has; the
        micro-batch is searched either way when the step fits (the largest that fits).
      estimate_time: compile the small programs of timing.py for the seconds per phase.
      model_cfg: the architecture (default: from cfg.model via `model_config`).
      config_name: a label for reports (e.g. the YAML file name).
      log: optional callable taking progress strings.

    Raises:
      ValueError: an unknown slice, a mesh that does not match it or does not divide a
        dimension, a model plan cannot resolve offline; ConfigError: batch sizes that do not
        split over the mesh's data axis.
    """
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom={headroom} must be in [0, 1)")
    s = tpu_lib.slice_spec(tpu)
    base = model_cfg or model_config(cfg)
    D, M = _mesh_shape(cfg, s, base, mesh)
    where = target(s, devices)
    device_mesh = sharding_lib.make_mesh((D, M), where.devices)
    _check_batch(cfg, D)
    usable = int(s.hbm_bytes * (1 - headroom))
    limit = usable if where.compiler == "tpu" else None
    trials = _Trials(cfg, base, device_mesh, D, usable, limit, log or (lambda _: None))
    changed: dict[str, Any] = {}
    sample = trials.fitting_sample(changed) if search else trials.sample({})
    shapes = plan_shapes(cfg)
    remat, rows = trials.fitting_train(changed, shapes, search)
    train = trials.train(changed, remat, rows)
    final, final_mcfg = trials.configured(
        {**changed, "model.remat": remat, "optim.micro_batch_size": rows}
    )
    estimate = None
    if estimate_time:
        estimate = plan_time.estimate(
            final, final_mcfg, plan_shapes(final), device_mesh, s, trials.log
        )
    return Plan(
        config=config_name,
        model=cfg.model.name_or_path,
        n_params=programs.n_params(base),
        trained_params=programs.n_trained(base),
        lora=dataclasses.asdict(cfg.model.lora) if cfg.model.lora.rank else None,
        slice=s,
        mesh=(D, M),
        compiler=where.compiler,
        compiler_note=where.note,
        headroom=headroom,
        shapes=shapes,
        settings={k: _get(final, k) for k in KNOBS if has_key(final, k)},
        changed=changed,
        sample=sample,
        train=train,
        micro_batches={r: p.total for (o, r), p in trials.tried.items() if o == remat},
        time=estimate,
    )


def _mesh_shape(cfg: Config, s: tpu_lib.Slice, base: ModelConfig, mesh) -> tuple[int, int]:
    """(D, M) of the mesh asked for, or of the slice's default; it must use every chip."""
    if mesh is None:
        mesh = tpu_lib.default_mesh(s, base.num_kv_heads, cfg.data.batch_prompts)
    D, M = sharding_lib.parse_mesh_shape(mesh) if isinstance(mesh, str) else mesh
    if s.chips != D * M:
        raise ValueError(
            f"mesh {D}x{M} needs {D * M} devices but {s.name} has {s.chips} chips; choose D and M "
            f"with D*M = {s.chips}"
        )
    return D, M


def _check_batch(cfg: Config, D: int) -> None:
    config_lib.validate_config(cfg, data_axis_size=D)
    if cfg.data.batch_prompts % D:
        raise ConfigError(
            f"data.batch_prompts={cfg.data.batch_prompts} prompts do not split over the mesh's "
            f"data axis ({D}): the sampler prefills each prompt on one data shard; choose a "
            f"mesh whose data size divides {cfg.data.batch_prompts}"
        )


@dataclasses.dataclass
class _Trials:
    """The phases of one config under changed settings, each train setting compiled once."""

    cfg: Config
    base: ModelConfig
    mesh: Mesh
    D: int
    usable: int  # bytes per device the plan may promise
    limit: int | None  # the compiler's memory limit (XLA:TPU only)
    log: Callable[[str], None]
    tried: dict[tuple, Phase] = dataclasses.field(default_factory=dict)  # (remat, rows) -> train

    def fits(self, phase: Phase) -> bool:
        return phase.total is not None and not phase.memory.refused and phase.total <= self.usable

    def configured(self, settings: dict[str, Any]) -> tuple[Config, ModelConfig]:
        c = programs.with_settings(self.cfg, settings)
        config_lib.validate_config(c, data_axis_size=self.D)
        return c, self.base.replace(**model_settings(c))

    def sample(self, settings: dict[str, Any]) -> Phase:
        return sample_phase(*self.configured(settings), self.mesh, self.limit, self.log)

    def train(self, changed: dict[str, Any], remat, rows: int) -> Phase:
        if (remat, rows) not in self.tried:
            settings = {**changed, "model.remat": remat, "optim.micro_batch_size": rows}
            self.tried[remat, rows] = train_phase(
                *self.configured(settings), self.mesh, self.limit, self.log
            )
        return self.tried[remat, rows]

    def fitting_sample(self, changed: dict[str, Any]) -> Phase:
        """The sampling phase, with fewer prompts per pass (`changed` records it) until one
        fits; when none does, the one that needs least."""
        sample = self.sample({})
        if self.fits(sample) or not has_key(self.cfg, "sample.prompt_chunk"):
            return sample
        P, usable = self.cfg.data.batch_prompts, self.usable
        for chunk in (c for c in range(P - 1, 0, -1) if P % c == 0 and c % self.D == 0):
            trial = self.sample({"sample.prompt_chunk": chunk})
            if (trial.total or usable + 1) < (sample.total or usable + 2):
                sample, changed["sample.prompt_chunk"] = trial, chunk
            if self.fits(trial):
                break
        return sample

    def fitting_train(self, changed: dict[str, Any], shapes: Shapes, search: bool):
        """(remat, micro-batch rows) of the train phase: the first remat choice with a
        micro-batch that fits, its largest (`changed` records what differs from the config);
        when nothing fits, the setting that needs least."""
        cfg = self.cfg
        candidates = programs.micro_batch_candidates(shapes.mini_batch_rows, self.D)
        remat0, rows0 = remat_choices(cfg)[0], cfg.optim.micro_batch_size or shapes.mini_batch_rows
        remat, rows = remat0, rows0
        for option in remat_choices(cfg) if search else [remat0]:
            best = largest_fitting(
                candidates if search else [rows0],
                lambda r, o=option: self.train(changed, o, r).total,
                self.usable,
            )
            if best is not None:
                remat, rows = option, best
                break
        else:
            if search:  # nothing fits: report the setting that needs least, and by how much
                need = lambda item: float("inf") if item[1].total is None else item[1].total
                remat, rows = min(self.tried.items(), key=need)[0]
        if remat != remat0:
            changed["model.remat"] = remat
        if rows != rows0:
            changed["optim.micro_batch_size"] = rows
        return remat, rows


def _get(cfg: Config, key: str) -> Any:
    section, leaf = key.split(".")
    return getattr(getattr(cfg, section), leaf)
