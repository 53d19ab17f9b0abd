"""`bench sample`: grouped-rollout tokens/s of our sampler vs transformers' `generate`.

Shape suffixes: ttrl_jax/__init__.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ttrl_jax.bench import machine, models, profile
from ttrl_jax.bench.machine import si
from ttrl_jax.model.config import ModelConfig
from ttrl_jax.sampling import sampler, token_draw


@dataclasses.dataclass(frozen=True)
class SampleSize:
    """One grouped-rollout shape: P prompts of T tokens, N samples each, R new tokens."""

    prompts: int
    samples: int
    prompt_len: int
    new_tokens: int

    @classmethod
    def parse(cls, spec: str) -> SampleSize:
        """'8x16x128x256' -> P=8, N=16, T=128, R=256."""
        form = "PxNxTxR (prompts x samples x prompt tokens x new tokens), e.g. 8x16x128x256"
        return cls(*models.parse_size(spec, form))


def decode_step_cost(cfg: ModelConfig, size: SampleSize) -> dict[str, float]:
    """Bytes and matmul FLOPs of one decode step (averaged over the R-1 steps) and of the prefill.

    Bytes are what any implementation must read: every weight once, plus the keys and values of
    the distinct context (each prompt once, each row's response so far). FLOPs count the dense
    layers, the vocabulary projection and attention over that context.
    """
    P, N, T, R = size.prompts, size.samples, size.prompt_len, size.new_tokens
    B = P * N
    Q, K, H, V, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size, cfg.embed_dim
    L, itemsize = cfg.num_layers, jnp.dtype(cfg.dtype).itemsize
    layer_params = L * models.layer_matmul_params(cfg)
    all_params = layer_params + V * D * (1 if cfg.tie_embeddings else 2)
    kv_per_token = 2 * L * K * H * itemsize
    response = (R - 1) / 2  # mean response length seen by the decode steps
    return {
        "step_bytes": all_params * itemsize + kv_per_token * (P * T + B * response),
        "step_flops": 2 * B * (layer_params + V * D) + 4 * B * L * Q * H * (T + response),
        "prefill_bytes": all_params * itemsize,
        "prefill_flops": 2 * P * T * layer_params + 2 * P * V * D + 2 * P * L * Q * H * T * T,
    }


def run_sample(args: argparse.Namespace) -> dict[str, Any]:
    """Grouped-rollout tokens/s of our sampler vs transformers' `generate`, same weights and
    sampling settings, against the machine's roofline."""
    import torch

    torch.set_num_threads(machine.cpu_cores())
    machine_ = machine.Machine.measure(args.dtype)
    print(machine_.describe(), flush=True)
    cfg, params = models.load(args, args.dtype)
    torch_model = models.torch_model(params, cfg, args.dtype).eval()
    models.label_unembedding(torch_model)
    settings = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    sp = token_draw.SamplingParams.make(**settings)
    print(
        f"sample: {models.describe(cfg)}, {args.dtype}; "
        + ", ".join(f"{k} {v}" for k, v in settings.items())
        + "; no stop tokens (every row generates all R tokens)",
        flush=True,
    )
    results: dict[str, Any] = {"peak_flops": machine_.peak_flops, "bandwidth": machine_.bandwidth}
    for spec in args.sizes:
        size = SampleSize.parse(spec)
        results[spec] = _sample_one_size(args, cfg, params, torch_model, sp, settings, size)
        _print_sample_size(cfg, size, results[spec], machine_, args)
    return results


def _sample_one_size(args, cfg, params, torch_model, sp, settings, size: SampleSize) -> dict:
    import torch

    P, N, T, R = size.prompts, size.samples, size.prompt_len, size.new_tokens
    prompt_PT = np.random.default_rng(0).integers(1, cfg.vocab_size, (P, T)).astype(np.int32)
    prompt_dev, mask_dev = jnp.asarray(prompt_PT), jnp.asarray(np.ones((P, T), bool))
    fn = sampler.compiled_sampler(cfg, N, R, (), 0)
    key = jax.random.key(0)
    t0 = time.perf_counter()
    compiled = fn.lower(params, prompt_dev, mask_dev, key, sp).compile()
    compile_s = time.perf_counter() - t0
    calls = [0]

    def ours():
        calls[0] += 1
        out = compiled(params, prompt_dev, mask_dev, jax.random.key(calls[0]), sp)
        assert int(out.num_steps) == R - 1  # no stop tokens: every row ran to the end
        return out

    input_ids = torch.tensor(prompt_PT, dtype=torch.long)

    def theirs():
        with torch.inference_mode():
            out = torch_model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=True,
                max_new_tokens=R,
                min_new_tokens=R,
                num_return_sequences=N,
                pad_token_id=0,
                **settings,
            )
        assert out.shape == (P * N, T + R)

    # The sampling head alone (one step's B×V logits): our inverse-CDF draw vs Gumbel-max.
    z_BV = jax.random.normal(jax.random.key(0), (P * N, cfg.vocab_size)) * 3
    inverse_cdf = jax.jit(token_draw.sample_scaled)
    gumbel = jax.jit(lambda z, key: jax.random.categorical(key, z, axis=-1))
    head = machine.time_best_interleaved(
        {
            "inverse_cdf": lambda: jax.block_until_ready(inverse_cdf(z_BV, jax.random.key(1), sp)),
            "gumbel": lambda: jax.block_until_ready(gumbel(z_BV, jax.random.key(1))),
        },
        repeats=5,
    )
    # The largest op of a decode step on its own: the unembedding product of B rows, XLA's dot
    # on the same weights. Its time bounds how close to the roofline any XLA:CPU sampler gets.
    h_BD = jax.random.normal(jax.random.key(2), (P * N, cfg.embed_dim), cfg.dtype)
    unembed = jax.jit(lambda h, e: jnp.einsum("BD,VD->BV", h, e))
    embed_VD = params["params"]["embed"].astype(cfg.dtype)
    unembed_s = machine.time_best(lambda: unembed(h_BD, embed_VD).block_until_ready(), repeats=5)
    timed = profile.race(ours, theirs, compiled.as_text(), args)
    return {"race": timed, "compile_s": compile_s, "head": head, "unembed_s": unembed_s}


def _print_sample_size(cfg, size: SampleSize, res: dict, machine_, args):
    P, N, T, R = size.prompts, size.samples, size.prompt_len, size.new_tokens
    B = P * N
    peak, bandwidth = machine_.peak_flops, machine_.bandwidth
    cost = decode_step_cost(cfg, size)
    step_s = max(cost["step_flops"] / peak, cost["step_bytes"] / bandwidth)
    prefill_s = max(cost["prefill_flops"] / peak, cost["prefill_bytes"] / bandwidth)
    roof_s = prefill_s + (R - 1) * step_s
    bound = "matmul" if cost["step_flops"] / peak > cost["step_bytes"] / bandwidth else "bandwidth"
    lines = [
        f"  P={P} prompts x N={N} samples = {B} rows, prompt {T} tokens, {R} new tokens",
        f"    per decode step: {si(cost['step_bytes'], 'B')} to read, "
        f"{si(cost['step_flops'], 'FLOP')} -> {bound}-bound, roofline {step_s * 1e3:.1f} ms "
        f"(whole call incl. prefill: {roof_s:.2f} s = {B * R / roof_s:,.0f} tokens/s)",
    ]
    timed = res["race"]
    for name, seconds in timed.seconds.items():
        lines.append(
            f"    {name:>12}: best of {args.repeats}: {seconds:.2f} s -> "
            f"{B * R / seconds:,.1f} tokens/s, {roof_s / seconds:.0%} of the roofline"
        )
    res["ratio"] = timed.ratio
    res["roofline_fraction"] = roof_s / timed.seconds["ttrl_jax"]
    head = res["head"]
    lines += [
        f"    tokens/s ratio ttrl_jax / transformers: {timed.ratio:.2f}x "
        f"(ttrl_jax compile {res['compile_s']:.1f} s, excluded)",
        f"    per step: ttrl_jax {timed.seconds['ttrl_jax'] / R * 1e3:.1f} ms (prefill included);"
        f" the unembedding product alone ({B}x{cfg.embed_dim} by {cfg.embed_dim}x"
        f"{cfg.vocab_size}, XLA's dot) {res['unembed_s'] * 1e3:.1f} ms = "
        f"{res['unembed_s'] / step_s:.0%} of the step's roofline",
        f"    sampling head per step ({B}x{cfg.vocab_size}): inverse-CDF "
        f"{head['inverse_cdf'] * 1e3:.1f} ms (with log-prob and entropy), Gumbel-max "
        f"{head['gumbel'] * 1e3:.1f} ms (token only)",
    ]
    lines += timed.tail_lines("    ")
    print("\n".join(lines), flush=True)


def add_sample_command(sub: argparse._SubParsersAction) -> None:
    sizes = ["1x1x128x128", "8x16x128x256"], "PxNxTxR: prompts x samples x prompt x new tokens"
    p = models.add_command(
        sub, "sample", "grouped-rollout tokens/s vs transformers generate", run_sample, sizes
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    profile.add_race_args(p, repeats=2, warmup=1)
