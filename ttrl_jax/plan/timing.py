"""The compiler's estimate of the seconds each phase of a TTRL step takes, per device.

XLA's cost analysis of a compiled program gives per-device flops and bytes accessed, but counts
the body of every loop once, whatever its trip count: a scan of four matmuls reports the flops
of one, and the sampler's decode `while_loop`, whose trip count depends on the data, adds
nothing at all (both checked on XLA:TPU). XLA:TPU's own `optimal_seconds` is a negative
placeholder for a program with a loop. So the plan compiles small loop-free (or one-trip)
programs, the pieces a step repeats, and multiplies each by how often a step runs it:

- sampling = prefill + passes x (max_new_tokens - 1) decode steps, the loop's upper bound (it
  stops earlier only once every row has stopped), and with LoRA the merge of the base and the
  adapters into the sampler's weights (run/setup.py: once per step). The prefill is the sampler
  compiled for one new token, with 0 and 1 layers. A decode step is the sampler's one-token
  forward and token draw (decode.py, token_draw.py) for one pass's rows, compiled once and
  twice in a row (the difference is one step: the set-up cancels) with 0 and 1 layers, and with
  a response cache of one slot and of all R - 1: a step reads the cache as far as it is filled,
  about half of it on average.
- training = updates x (one optimizer update) + rows per device x (one row's work: its old and
  reference log-probs and the loss's forward and backward), from the train step compiled for
  1 and 2 rows per device in one mini- and micro-batch, with 0 and 2 layers (a scan of 2 layers
  counts one, with the recomputation of model.remat; the optimizer's work on stacked layers is
  counted for both).

Each piece's flops and bytes become seconds at the chip's peak (`tpu.roofline_seconds`: the
larger of flops / peak bf16 rate and bytes / HBM bandwidth). The figures are lower bounds:
collectives and host work are not counted, and a step at 40-60 % of peak takes about twice as
long.

Shape suffixes: ttrl_jax/__init__.py.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ttrl_jax import sharding as sharding_lib
from ttrl_jax.config.schema import Config
from ttrl_jax.model.config import ModelConfig
from ttrl_jax.plan import programs
from ttrl_jax.plan import tpu as tpu_lib
from ttrl_jax.run import from_config
from ttrl_jax.sampling import decode, token_draw
from ttrl_jax.sampling import sampler as sampler_lib


@dataclasses.dataclass(frozen=True)
class Cost:
    """Per-device flops and bytes accessed of a program (or of a piece, as a difference)."""

    flops: float
    bytes: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def __sub__(self, other: Cost) -> Cost:
        return Cost(self.flops - other.flops, self.bytes - other.bytes)

    def __mul__(self, k: float) -> Cost:
        return Cost(self.flops * k, self.bytes * k)


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Seconds per device of each phase, and the pieces they are made of."""

    sample_s: float
    train_s: float
    prefill_s: float
    decode_step_s: float  # one step of one pass over the prompts
    decode_steps: int  # per pass: max_new_tokens - 1, the most the loop runs
    passes: int  # sampling passes (sample.prompt_chunk)
    merge_s: float  # LoRA: merging the adapters into the sampler's weights (0 without)
    update_s: float  # one optimizer update (and what else a mini-batch does once)
    row_s: float  # one trained row's log-probs, forward and backward
    updates: int
    rows_per_device: int
    compile_s: float


# Costs compiled so far, by what determines them.
_COSTS: dict[tuple, tuple[Cost, float]] = {}


def cost(key: tuple, build, log, what: str) -> tuple[Cost, float]:
    """(cost, compile seconds) of the program `build()` returns as (jitted, args), cached."""
    if key not in _COSTS:
        log(f"compiling {what} for its cost ...")
        jitted, args = build()
        t0 = time.perf_counter()
        with jax.default_matmul_precision("default"):  # as a run compiles
            analysis = jitted.lower(*args).compile().cost_analysis()
        if isinstance(analysis, list):  # older jax: one dict per program
            analysis = analysis[0]
        seconds = time.perf_counter() - t0
        _COSTS[key] = Cost(analysis.get("flops", 0.0), analysis.get("bytes accessed", 0.0)), seconds
        log(f"  {seconds:.0f} s")
    return _COSTS[key]


def estimate(
    cfg: Config,
    mcfg: ModelConfig,
    shapes: programs.Shapes,
    mesh: Mesh,
    s: tpu_lib.Slice,
    log,
) -> Estimate:
    """Seconds per device of sampling and of the train step for `cfg` on the slice's mesh."""
    L = mcfg.num_layers
    spent = []

    def piece(key, build, what):
        c, seconds = cost((*key, cfg, mesh), build, log, what)
        spent.append(seconds)
        return c

    # Sampling: the prefill (and the first token) at 0 and 1 layers, then one decode step.
    prefill = {
        n: piece(
            ("prefill", mcfg.replace(num_layers=n)),
            lambda n=n: _prefill_program(cfg, mcfg.replace(num_layers=n), mesh),
            f"the prefill ({n} layers)",
        )
        for n in (0, 1)
    }
    # One decode step reads the response cache as far as it is filled: on average about half
    # of it (in blocks of KV_BLOCK slots). Its layers' cost at a full and at a one-slot cache.
    S = max(shapes.response_len - 1, 1)
    steps = {
        (n, k, slots): piece(
            ("decode", mcfg.replace(num_layers=n), k, slots),
            lambda n=n, k=k, slots=slots: _decode_program(
                cfg, mcfg.replace(num_layers=n), shapes, mesh, k, slots
            ),
            f"{k} decode step(s) ({n} layers, {slots} cache slots)",
        )
        for n, slots in ((0, 1), (1, 1), (1, S))
        for k in (1, 2)
    }
    step = {
        key: steps[(*key[:1], 2, key[1])] - steps[(*key[:1], 1, key[1])]
        for key in ((0, 1), (1, 1), (1, S))
    }
    filled = min(1.0, (S + sampler_lib.KV_BLOCK) / (2 * S))  # the mean share read per step
    layer = step[1, 1] + (step[1, S] - step[1, 1]) * filled - step[0, 1]
    passes = shapes.prompts // shapes.pass_prompts
    prefill_s = s_of(s, prefill[0] + (prefill[1] - prefill[0]) * L)
    merge_s = 0.0
    if mcfg.lora is not None:  # no loop in it: its cost analysis counts every layer
        merge = piece(("merge", mcfg), lambda: programs.merge_program(cfg, mcfg, mesh), "the merge")
        merge_s = s_of(s, merge)
    decode_step_s = s_of(s, step[0, 1] + layer * L)
    decode_steps = max(shapes.response_len - 1, 0)

    # Training: one row per device more, and what a mini-batch does once, at 0 and 2 layers.
    D = sharding_lib.data_size(mesh)
    units = {
        (n, k): piece(
            ("train", mcfg.replace(num_layers=n), k),
            lambda n=n, k=k: _train_unit(cfg, mcfg.replace(num_layers=n), shapes, mesh, k * D),
            f"the train step ({k * D} rows, {n} layers)",
        )
        for n in (0, 2)
        for k in (1, 2)
    }
    row = {n: units[n, 2] - units[n, 1] for n in (0, 2)}
    fixed = {n: units[n, 1] - row[n] for n in (0, 2)}
    row_s = s_of(s, row[0] + (row[2] - row[0]) * L)
    update_s = s_of(s, fixed[0] + (fixed[2] - fixed[0]) * (L / 2))
    updates = from_config.updates_per_step(cfg)
    rows_per_device = shapes.prompts * shapes.n_train // D
    return Estimate(
        sample_s=merge_s + prefill_s + passes * decode_steps * decode_step_s,
        train_s=updates * update_s + rows_per_device * row_s,
        prefill_s=prefill_s,
        decode_step_s=decode_step_s,
        decode_steps=decode_steps,
        passes=passes,
        merge_s=merge_s,
        update_s=update_s,
        row_s=row_s,
        updates=updates,
        rows_per_device=rows_per_device,
        compile_s=sum(spent),
    )


def s_of(s: tpu_lib.Slice, c: Cost) -> float:
    return tpu_lib.roofline_seconds(s, c.flops, c.bytes)


def _prefill_program(cfg, mcfg, mesh) -> tuple[Any, tuple]:
    """The rollout sampler for one new token: prefill, the first draw, no decode step."""
    built = programs.sample_program(cfg, mcfg, mesh, max_new_tokens=1)
    return built.jitted, built.args


def _train_unit(cfg, mcfg, shapes, mesh, rows: int) -> tuple[Any, tuple]:
    """The train step on `rows` rows (one response per prompt) in one mini- and micro-batch,
    its log-probs unembedded in one chunk: every loop of the step runs once."""
    unit = programs.with_settings(
        cfg,
        {
            "data.batch_prompts": rows,
            "sample.n_vote": 1,
            "sample.n_train": 1,
            "optim.mini_batch_prompts": rows,
            "optim.micro_batch_size": rows,
        },
    )
    built = programs.train_program(unit, mcfg, mesh, logit_chunk=shapes.response_len)
    return built.jitted, built.args


def _decode_program(cfg, mcfg, shapes, mesh, n_steps: int, slots: int) -> tuple[Any, tuple]:
    """`n_steps` decode steps of one sampling pass in a row (no loop), over response caches of
    `slots` slots read whole."""
    P, N = shapes.pass_prompts, shapes.n_vote
    B, K, H = P * N, mcfg.num_kv_heads, mcfg.head_dim
    one_pass = dataclasses.replace(shapes, prompts=P)

    def steps(params, prompt_PT, mask_PT, key, sampling, k_gen, v_gen):
        _, prompt_kv = sampler_lib.prefill_prompts(mcfg, params, prompt_PT, mask_PT)
        dparams = decode.decode_params(mcfg, params, fuse=decode.split_size("heads") == 1)
        token_B = jnp.zeros((B,), jnp.int32)
        n_prompt_B = jnp.repeat(mask_PT.sum(-1, dtype=jnp.int32), N)
        temperature = jnp.where(sampling.temperature > 0, sampling.temperature, 1.0)
        key_B = jax.random.split(key, B)
        drawn = []
        for slot in range(n_steps):
            z_BV, k_gen, v_gen = decode.decode_step(
                mcfg, dparams, token_B, n_prompt_B + slot, min(slot, slots - 1), k_gen, v_gen,
                prompt_kv, mask_PT, N, temperature, slots,
            )  # fmt: skip
            token_B, logp_B, entropy_B = token_draw.sample_scaled(z_BV, key_B, sampling)
            drawn.append((token_B, logp_B, entropy_B))
        return drawn, k_gen, v_gen

    # The response caches as arguments, laid out as the sampler lays them out.
    dtype, L = jnp.dtype(mcfg.dtype), mcfg.num_layers
    caches = [jax.ShapeDtypeStruct((B, K, H, slots), dtype)] * L + [
        jax.ShapeDtypeStruct((B, K, slots, H), dtype)
    ] * L
    names = [("batch", "kv_heads", "head_dim", "cache_seq")] * L + [
        ("batch", "kv_heads", "cache_seq", "head_dim")
    ] * L
    rules = sharding_lib.SAMPLE_RULES
    placed = programs.abstract(
        caches, sharding_lib.logical_to_shardings(caches, names, mesh, rules, what="kv cache")
    )
    args = (
        programs.params_abstract(mcfg, mesh, rules),
        *programs.prompts_abstract(one_pass, mesh),
        programs.abstract_key(mesh),
        programs.replicated_like(jax.eval_shape(token_draw.SamplingParams.make), mesh),
        tuple(placed[:L]),
        tuple(placed[L:]),
    )
    return jax.jit(sharding_lib.with_rules(steps, mesh, rules)), args
