"""`bench forward`: prefill throughput of our jitted forward vs transformers, same weights.

Shape suffixes: ttrl_jax/__init__.py.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ttrl_jax.bench import machine, models, profile
from ttrl_jax.bench.machine import si
from ttrl_jax.model import decoder as model_lib
from ttrl_jax.model.config import ModelConfig


def forward_flops(cfg: ModelConfig, batch: int, seq: int) -> dict[str, int]:
    """Matmul FLOPs of one full forward (logits at every position).

    Attention counts the full T×T score and value products, which both implementations compute
    (masking does not skip work).
    """
    tokens = batch * seq
    flops = {
        "dense": 2 * cfg.num_layers * models.layer_matmul_params(cfg) * tokens,
        "attention": cfg.num_layers * 2 * 2 * batch * cfg.num_heads * seq * seq * cfg.head_dim,
        "lm head": 2 * cfg.embed_dim * cfg.vocab_size * tokens,
    }
    flops["total"] = sum(flops.values())
    return flops


def run_forward(args: argparse.Namespace) -> dict[str, Any]:
    """Prefill throughput of our jitted forward vs transformers' PyTorch model, same weights."""
    import torch

    torch.set_num_threads(machine.cpu_cores())
    B, T = args.batch, args.seq
    machine_ = machine.Machine.measure(args.dtype)
    print(machine_.describe(), flush=True)
    cfg, params = models.load(args, args.dtype)
    torch_model = models.torch_model(
        params, cfg, args.dtype, attn_implementation=args.torch_attention
    ).eval()
    models.label_unembedding(torch_model)

    tokens_BT = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    positions_BT = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    inputs = (params, jnp.asarray(tokens_BT), jnp.asarray(positions_BT))
    t0 = time.perf_counter()
    compiled = (
        jax.jit(lambda p, t, pos: model_lib.forward(cfg, p, t, pos)[0]).lower(*inputs).compile()
    )
    compile_s = time.perf_counter() - t0
    ours = lambda: compiled(*inputs).block_until_ready()
    input_ids = torch.tensor(tokens_BT, dtype=torch.long)
    attention_mask = torch.ones_like(input_ids)

    def theirs():
        with torch.inference_mode():
            return torch_model(input_ids=input_ids, attention_mask=attention_mask).logits

    # The first call of each is the first warm-up run; their logits are compared, so the
    # figures are known to be for the same computation.
    diff = float(np.abs(np.asarray(ours(), np.float32) - theirs().float().numpy()).max())
    timed = profile.race(ours, theirs, compiled.as_text(), args)
    machine_ = machine_.remeasured()

    flops = forward_flops(cfg, B, T)
    peak = machine_.peak_flops
    lines = [
        f"forward: {models.describe(cfg)}, batch {B} x seq {T}, {args.dtype}",
        "  matmul FLOPs per forward: "
        + ", ".join(f"{name} {si(v, 'FLOP')}" for name, v in flops.items()),
        f"  matmul peak (the higher of two measurements): {si(peak, 'FLOP/s')}",
        f"  ttrl_jax (jax.jit; compile {compile_s:.1f} s, excluded); transformers "
        f"({args.torch_attention} attention); best of {args.repeats} after a compared first run:",
    ]
    total = {"ttrl_jax": flops["total"], "transformers": flops["total"]}
    lines += timed.rate_lines(B * T, "tokens", total, peak, "  ")
    lines.append(f"  max |logit difference|: {diff:.2e}")
    lines += timed.tail_lines("  ")
    print("\n".join(lines), flush=True)
    return {
        "flops": flops,
        "machine": machine_,
        "race": timed,
        "ratio": timed.ratio,
        "logit_diff": diff,
    }


def add_forward_command(sub: argparse._SubParsersAction) -> None:
    help = "prefill tokens/s vs transformers (PyTorch)"
    p = models.add_command(sub, "forward", help, run_forward)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--torch-attention", choices=("sdpa", "eager"), default="sdpa")
    profile.add_race_args(p, repeats=3, warmup=0)
