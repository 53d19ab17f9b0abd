"""Benchmarks: `python -m ttrl_jax.bench forward|sample|train ...`.

The shared pieces come first: the machine's measured matmul peak and memory bandwidth, a load
probe, and a timer (warm-up excluded, best of k). Each sub-command registers its own parser in
`COMMANDS` and prints its figures against those machine numbers.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import psutil

from ttrl_jax import grpo, train, weights
from ttrl_jax import model as model_lib

# ----------------------------------------------------------------------------- shared pieces


def cpu_cores() -> int:
    """Cores this process may run on (what both JAX and torch get)."""
    return len(os.sched_getaffinity(0))


def time_once(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call; `fn` must block until its work is done."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_best(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 3) -> float:
    """Best wall time of `repeats` calls after `warmup` untimed calls (compiles, caches)."""
    for _ in range(warmup):
        fn()
    return min(time_once(fn) for _ in range(repeats))


def time_best_interleaved(
    fns: dict[str, Callable[[], Any]], *, warmup: int = 1, repeats: int = 3
) -> dict[str, float]:
    """Best times of several contenders, run in turn so a load spike on a shared machine hits
    them alike rather than whichever happened to be running."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_once(fn))
    return {name: min(t) for name, t in times.items()}


def measure_matmul_peak(n: int = 2048, dtype: str = "float32", repeats: int = 5) -> float:
    """Best matmul FLOP/s of the default JAX device: `jnp.dot` of two n×n matrices."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    dot = jax.jit(jnp.dot)
    seconds = time_best(lambda: dot(a, b).block_until_ready(), warmup=1, repeats=repeats)
    return 2 * n**3 / seconds


def measure_memory_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Best bytes/s of an in-place elementwise pass over a large float32 array (read + write).

    The buffer is donated, so the figure is not diluted by allocating and page-faulting a fresh
    output on every call.
    """
    step = jax.jit(lambda v: v + 1.0, donate_argnums=0)
    state = [jnp.zeros(nbytes // 4, jnp.float32)]

    def run():
        state[0] = step(state[0])
        state[0].block_until_ready()

    return 2 * nbytes / time_best(run, warmup=1, repeats=repeats)


@dataclasses.dataclass
class LoadProbe:
    """How busy the machine was between `start()` and `stop()`: on a shared machine the figures
    mean little without it."""

    load_before: float = 0.0
    load_after: float = 0.0
    system_busy: float = 0.0  # fraction of all cores busy (anyone)
    own_busy: float = 0.0  # fraction of all cores used by this process
    _t0: float = 0.0
    _own0: float = 0.0

    def start(self) -> LoadProbe:
        self.load_before = os.getloadavg()[0]
        psutil.cpu_percent(interval=None)  # resets psutil's system-wide counter
        self._own0 = sum(psutil.Process().cpu_times()[:2])
        self._t0 = time.perf_counter()
        return self

    def stop(self) -> LoadProbe:
        wall = time.perf_counter() - self._t0
        self.system_busy = psutil.cpu_percent(interval=None) / 100
        own = sum(psutil.Process().cpu_times()[:2]) - self._own0
        self.own_busy = own / (wall * psutil.cpu_count())
        self.load_after = os.getloadavg()[0]
        return self

    def describe(self) -> str:
        others = max(self.system_busy - self.own_busy, 0.0)
        return (
            f"1-min load average {self.load_before:.1f} before, {self.load_after:.1f} after "
            f"({psutil.cpu_count()} logical CPUs); during the timed runs all CPUs were "
            f"{self.system_busy:.0%} busy: this process {self.own_busy:.0%}, others {others:.0%}"
        )


def si(x: float, unit: str) -> str:
    """12345678 -> '12.3 M<unit>'."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.1f} {prefix}{unit}"
    return f"{x:.1f} {unit}"


def describe_machine(dtype: str, peak: float, bandwidth: float) -> str:
    import torch

    devices = jax.devices()
    return "\n".join(
        [
            f"machine: {cpu_cores()} cores; jax {jax.__version__} on {len(devices)} "
            f"{devices[0].platform} device(s); torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads",
            f"  matmul peak ({dtype}, jnp.dot 2048x2048, best of 5): {si(peak, 'FLOP/s')}",
            f"  memory bandwidth (in-place x+1, 256 MiB, best of 5): {si(bandwidth, 'B/s')}",
        ]
    )


# ----------------------------------------------------------------------------- forward

# Qwen2.5-0.5B's shapes (layer count set on the command line).
QWEN25_05B_HF = dict(
    model_type="qwen2",
    vocab_size=151936,
    hidden_size=896,
    num_attention_heads=14,
    num_key_value_heads=2,
    head_dim=64,
    intermediate_size=4864,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
)


def forward_flops(cfg: model_lib.ModelConfig, batch: int, seq: int) -> dict[str, int]:
    """Matmul FLOPs of one full forward (logits at every position).

    Attention counts the full T×T score and value products, which both implementations compute
    (masking does not skip work).
    """
    D, Q, K, H, F = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    tokens = batch * seq
    layer_params = D * (Q + 2 * K) * H + Q * H * D + 3 * D * F
    flops = {
        "dense": 2 * cfg.num_layers * layer_params * tokens,
        "attention": cfg.num_layers * 2 * 2 * batch * Q * seq * seq * H,
        "lm head": 2 * D * cfg.vocab_size * tokens,
    }
    flops["total"] = sum(flops.values())
    return flops


def run_forward(args: argparse.Namespace) -> dict[str, Any]:
    """Prefill throughput of our jitted forward vs transformers' PyTorch model, same weights."""
    import torch
    import transformers

    torch.set_num_threads(cpu_cores())
    cfg = model_lib.ModelConfig.from_hf(
        {**QWEN25_05B_HF, "num_hidden_layers": args.layers},
        dtype=args.dtype,
        param_dtype=args.dtype,
    )
    B, T = args.batch, args.seq
    peak = measure_matmul_peak(dtype=args.dtype)
    bandwidth = measure_memory_bandwidth()
    print(describe_machine(args.dtype, peak, bandwidth), flush=True)

    params = jax.jit(model_lib.init_params, static_argnums=0)(cfg, jax.random.key(0))
    with tempfile.TemporaryDirectory() as tmp:
        # The torch model gets our weights through our own HF export.
        folder = weights.save_hf(params, cfg, os.path.join(tmp, "model"), dtype=args.dtype)
        torch_model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=getattr(torch, args.dtype), attn_implementation=args.torch_attention
        ).eval()

    tokens_BT = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    positions_BT = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    ours = jax.jit(lambda p, t, pos: model_lib.forward(cfg, p, t, pos)[0])
    tokens_dev, positions_dev = jnp.asarray(tokens_BT), jnp.asarray(positions_BT)
    input_ids = torch.tensor(tokens_BT, dtype=torch.long)
    attention_mask = torch.ones_like(input_ids)

    def theirs():
        with torch.inference_mode():
            return torch_model(input_ids=input_ids, attention_mask=attention_mask).logits

    # The first call of each is the first warm-up run (ours compiles in it); their logits are
    # compared, so the figures are known to be for the same computation.
    t0 = time.perf_counter()
    ours_BTV = ours(params, tokens_dev, positions_dev).block_until_ready()
    compile_s = time.perf_counter() - t0
    diff = float(np.abs(np.asarray(ours_BTV, np.float32) - theirs().float().numpy()).max())
    del ours_BTV
    probe = LoadProbe().start()
    best = time_best_interleaved(
        {
            "ttrl_jax": lambda: ours(params, tokens_dev, positions_dev).block_until_ready(),
            "transformers": theirs,
        },
        warmup=max(args.warmup - 1, 0),
        repeats=args.repeats,
    )
    probe.stop()

    flops = forward_flops(cfg, B, T)
    tied = "tied" if cfg.tie_embeddings else "untied"
    lines = [
        f"forward: {cfg.model_type} L={cfg.num_layers} D={cfg.embed_dim} Q={cfg.num_heads} "
        f"K={cfg.num_kv_heads} H={cfg.head_dim} F={cfg.mlp_dim} V={cfg.vocab_size} {tied}, "
        f"batch {B} x seq {T}, {args.dtype}",
        "  matmul FLOPs per forward: "
        + ", ".join(f"{name} {si(v, 'FLOP')}" for name, v in flops.items()),
        f"  ttrl_jax (jax.jit; compile + first run {compile_s:.1f} s, excluded)",
        f"  transformers ({args.torch_attention} attention)",
    ]
    results: dict[str, Any] = {"flops": flops, "peak_flops": peak, "bandwidth": bandwidth}
    for name, seconds in best.items():
        rate = flops["total"] / seconds
        results[name] = {"seconds": seconds, "tokens_per_s": B * T / seconds, "flops": rate}
        lines.append(
            f"  {name:>12}: best of {args.repeats}: {seconds:.3f} s -> "
            f"{B * T / seconds:,.0f} tokens/s, {si(rate, 'FLOP/s')} ({rate / peak:.0%} of peak)"
        )
    ratio = best["transformers"] / best["ttrl_jax"]
    results["ratio"] = ratio
    lines += [
        f"  tokens/s ratio ttrl_jax / transformers: {ratio:.2f}x",
        f"  max |logit difference|: {diff:.2e}",
        f"  load: {probe.describe()}",
    ]
    print("\n".join(lines), flush=True)
    return results


def add_forward_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "forward",
        help="prefill tokens/s vs transformers (PyTorch) on Qwen2.5-0.5B shapes",
        description=run_forward.__doc__,
    )
    p.add_argument("--layers", type=int, default=4, help="decoder layers (the real model has 24)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--torch-attention", choices=("sdpa", "eager"), default="sdpa")
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed runs (the first compiles; its logits are compared)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the best is reported")
    p.set_defaults(run=run_forward)


# ----------------------------------------------------------------------------- train


def train_flops(
    cfg: model_lib.ModelConfig, rows: int, prompt_len: int, response_len: int, *, with_ref: bool
) -> dict[str, int]:
    """Model matmul FLOPs of one GRPO train step over `rows` sequences of prompt + response.

    Counted per position (padding included: both sides compute every position): the decoder's
    non-embedding matmuls (q/k/v/o and the MLP, 2 FLOPs per parameter in a forward) and the
    causal S×S attention products (S = prompt + response) counted in full; the lm head only
    at response positions (the only logits the loss needs, and the only ones either side
    computes). A forward is 1×, a forward + backward 3×. The step is one
    forward + backward of the policy, a no-grad forward for the old log-probs (recomputed under
    the rollout policy, as verl does), and one of the reference policy when the KL term is on.
    Not counted: the embedding gather and its scatter-add gradient, norms, softmaxes, the
    optimizer, and our recomputation of the lm head in the backward pass (`jax.checkpoint`
    on the logit chunks), so ours does more arithmetic than it is credited with.
    """
    D, Q, K, H, F = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    S = prompt_len + response_len
    layer_params = D * (Q + 2 * K) * H + Q * H * D + 3 * D * F
    forward = (
        2 * cfg.num_layers * layer_params * rows * S
        + cfg.num_layers * 2 * 2 * rows * Q * S * S * H
        + 2 * D * cfg.vocab_size * rows * response_len
    )
    flops = {"policy forward + backward": 3 * forward, "old log-prob forward": forward}
    if with_ref:
        flops["reference forward"] = forward
    flops["total"] = sum(flops.values())
    return flops


def make_rollout(
    cfg: model_lib.ModelConfig, P: int, N: int, T: int, R: int, seed: int = 0
) -> train.StepBatch:
    """A synthetic rollout batch with realistic padding and answers that split every group.

    Prompts are left-padded to T (real length in [T/2, T]), responses end somewhere in
    [R/2, R]; per prompt the last max(N // 4, 1) responses give answer 1 and the others answer
    0, so the vote picks 0 and every group has rewards of both kinds (non-zero advantages).
    """
    rng = np.random.default_rng(seed)
    prompt_len_P1 = rng.integers(T // 2 + 1, T + 1, (P, 1))
    response_len_PN1 = rng.integers(R // 2 + 1, R + 1, (P, N, 1))
    answer_id_PN = np.broadcast_to(np.arange(N) >= N - max(N // 4, 1), (P, N))
    return train.StepBatch(
        prompt_PT=jnp.asarray(rng.integers(0, cfg.vocab_size, (P, T)), jnp.int32),
        prompt_mask_PT=jnp.asarray(np.arange(T)[None] >= T - prompt_len_P1),
        response_PNR=jnp.asarray(rng.integers(0, cfg.vocab_size, (P, N, R)), jnp.int32),
        response_mask_PNR=jnp.asarray(np.arange(R)[None, None] < response_len_PN1),
        # The step recomputes old log-probs and only reports the mean entropy: zeros will do.
        logp_PNR=jnp.zeros((P, N, R), jnp.float32),
        entropy_PNR=jnp.zeros((P, N, R), jnp.float32),
        answer_id_PN=jnp.asarray(answer_id_PN, jnp.int32),
        gold_id_P=jnp.zeros((P,), jnp.int32),
    )


def our_first_minibatch(
    cfg: model_lib.ModelConfig,
    params: Any,
    batch: train.StepBatch,
    hyper: train.StepHyper,
    rows_mini: int,
    dual_clip: float,
    use_kl: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Log-probs, loss and grad norm of the first mini-batch update, built from the pieces the
    train step uses (`response_logp`, the vote, `grpo_loss`) at the initial params, where the
    old and reference policies equal the policy."""
    P, N = batch.answer_id_PN.shape
    first = lambda x_PN: x_PN.reshape((P * N,) + x_PN.shape[2:])[:rows_mini]
    prompt_BT = jnp.repeat(batch.prompt_PT, N, axis=0)[:rows_mini]
    pmask_BT = jnp.repeat(batch.prompt_mask_PT, N, axis=0)[:rows_mini]
    response_BR, rmask_BR = first(batch.response_PNR), first(batch.response_mask_PNR)
    logp_fn = lambda p: train.response_logp(
        cfg, p, prompt_BT, pmask_BT, response_BR, rmask_BR, hyper.temperature
    )["logp_BR"]
    old_BR = jax.lax.stop_gradient(logp_fn(params))
    majority_P, _ = grpo.majority_vote(batch.answer_id_PN)
    advantage_B = first(grpo.group_advantages(grpo.vote_reward(batch.answer_id_PN, majority_P)))

    def loss_fn(p):
        loss, _ = grpo.grpo_loss(
            logp_fn(p), old_BR, advantage_B, rmask_BR,
            logp_ref_BR=old_BR if use_kl else None,
            clip_low=hyper.clip_low, clip_high=hyper.clip_high, dual_clip=dual_clip,
            kl_coef=hyper.kl_coef if use_kl else 0.0,
        )  # fmt: skip
        return loss

    loss, grads = jax.value_and_grad(loss_fn)(params)
    return old_BR, loss, optax.tree.norm(grads)


def torch_rollout(batch: train.StepBatch) -> dict[str, Any]:
    """The rollout as verl's actor sees it: one row per response, prompt + response joined."""
    import torch

    P, N = batch.answer_id_PN.shape
    prompt_BT = np.repeat(np.asarray(batch.prompt_PT), N, axis=0)
    pmask_BT = np.repeat(np.asarray(batch.prompt_mask_PT), N, axis=0)
    response_BR = np.asarray(batch.response_PNR).reshape(P * N, -1)
    rmask_BR = np.asarray(batch.response_mask_PNR).reshape(P * N, -1)
    mask_BS = torch.tensor(np.concatenate([pmask_BT, rmask_BR], axis=1), dtype=torch.long)
    return {
        "input_ids": torch.tensor(np.concatenate([prompt_BT, response_BR], 1), dtype=torch.long),
        "attention_mask": mask_BS,
        "position_ids": torch.clamp(torch.cumsum(mask_BS, dim=1) - 1, min=0),
        "responses": torch.tensor(response_BR, dtype=torch.long),
        "response_mask": torch.tensor(rmask_BR, dtype=torch.float32),
        "answer_id_PN": np.asarray(batch.answer_id_PN),
    }


def torch_advantages(answer_id_PN: np.ndarray):
    """Upstream TTRL's vote (Counter, first-seen wins ties) and verl's GRPO advantage."""
    import torch

    rewards = []
    for row in answer_id_PN.tolist():
        counts = Counter(a for a in row if a >= 0)
        majority = counts.most_common(1)[0][0] if counts else None
        rewards.append([float(a == majority) for a in row])
    reward_PN = torch.tensor(rewards)
    mean_P1, std_P1 = reward_PN.mean(1, keepdim=True), reward_PN.std(1, keepdim=True)
    return ((reward_PN - mean_P1) / (std_P1 + 1e-6)).reshape(-1)


def torch_response_logp(model, rows: dict[str, Any], temperature: float):
    """verl's log-probs: forward, logits / temperature, log_softmax, gather the responses.

    Only the R + 1 last positions go through the lm head (`logits_to_keep`), as ours does.
    """
    import torch

    R = rows["responses"].shape[1]
    logits_BRV = model(
        input_ids=rows["input_ids"],
        attention_mask=rows["attention_mask"],
        position_ids=rows["position_ids"],
        use_cache=False,
        logits_to_keep=R + 1,
    ).logits[:, :-1]
    logp_BRV = torch.log_softmax(logits_BRV.float() / temperature, dim=-1)
    return logp_BRV.gather(-1, rows["responses"][..., None]).squeeze(-1)


def torch_grpo_loss(logp, old, ref, advantage_B, mask, *, clip, dual_clip, kl_coef):
    """verl's PPO loss with dual-clip, token-mean, plus k3 ("low_var_kl") KL to the reference."""
    import torch

    token_mean = lambda x: (x * mask).sum() / mask.sum().clamp(min=1.0)
    advantage = advantage_B[:, None]
    ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
    loss1 = torch.maximum(-advantage * ratio, -advantage * torch.clamp(ratio, 1 - clip, 1 + clip))
    loss2 = torch.minimum(-advantage * dual_clip, loss1)
    loss = token_mean(torch.where(advantage < 0, loss2, loss1))
    if ref is not None:
        d = torch.clamp(ref - logp, -20.0, 20.0)
        loss = loss + kl_coef * token_mean(torch.clamp(torch.exp(d) - d - 1, -10.0, 10.0))
    return loss


def torch_minibatches(rollout: dict[str, Any], rows_mini: int) -> list[dict[str, Any]]:
    """The rollout's rows in consecutive mini-batches (a prompt's responses stay together)."""
    n_rows = rollout["responses"].shape[0]
    return [
        {k: v[i : i + rows_mini] for k, v in rollout.items() if k != "answer_id_PN"}
        for i in range(0, n_rows, rows_mini)
    ]


def torch_train_step(policy, ref, optimizer, rollout: dict[str, Any], opts: dict[str, Any]):
    """One step as upstream TTRL runs it in verl: old and reference log-probs without grad,
    then per mini-batch forward → loss → backward → clip_grad_norm_ → AdamW step."""
    import torch

    minis = torch_minibatches(rollout, opts["rows_mini"])
    advantage_B = torch_advantages(rollout["answer_id_PN"])
    temperature = opts["temperature"]
    with torch.no_grad():
        old = [torch_response_logp(policy, m, temperature) for m in minis]
        refs = [None if ref is None else torch_response_logp(ref, m, temperature) for m in minis]
    losses = []
    for i, (mini, adv_B) in enumerate(zip(minis, advantage_B.split(opts["rows_mini"]))):
        optimizer.zero_grad(set_to_none=True)
        loss = torch_grpo_loss(
            torch_response_logp(policy, mini, temperature), old[i], refs[i], adv_B,
            mini["response_mask"], clip=opts["clip"], dual_clip=opts["dual_clip"],
            kl_coef=opts["kl_coef"],
        )  # fmt: skip
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return {"loss": losses}


def torch_first_minibatch(policy, ref, rollout: dict[str, Any], opts: dict[str, Any]):
    """The torch side of `our_first_minibatch`: log-probs, loss and gradient norm of the first
    mini-batch at the initial weights (no update).

    The norm is summed in float64: torch's float32 norm of a 10^8-element gradient (the tied
    embedding) is off by about a percent, which would hide how close the gradients are.
    """
    import torch

    first, temperature = torch_minibatches(rollout, opts["rows_mini"])[0], opts["temperature"]
    with torch.no_grad():
        old_BR = torch_response_logp(policy, first, temperature)
    policy.zero_grad(set_to_none=True)
    loss = torch_grpo_loss(
        torch_response_logp(policy, first, temperature), old_BR, None if ref is None else old_BR,
        torch_advantages(rollout["answer_id_PN"])[: opts["rows_mini"]],
        first["response_mask"], clip=opts["clip"], dual_clip=opts["dual_clip"],
        kl_coef=opts["kl_coef"],
    )  # fmt: skip
    loss.backward()
    norm = sum(float(p.grad.double().square().sum()) for p in policy.parameters()) ** 0.5
    policy.zero_grad(set_to_none=True)
    return old_BR.numpy(), loss.item(), norm


def torch_models(params: Any, cfg: model_lib.ModelConfig, attention: str, use_kl: bool):
    """transformers' policy with our weights (through our own HF export) and a frozen copy as
    the reference, or None without the KL term."""
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        folder = weights.save_hf(params, cfg, os.path.join(tmp, "model"))
        policy = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation=attention
        )
    policy.train()  # Qwen2 has no dropout: train mode changes nothing but is what verl runs
    ref = copy.deepcopy(policy).eval().requires_grad_(False) if use_kl else None
    return policy, ref


def compare_first_minibatch(ours, theirs, batch: train.StepBatch, rows_mini: int) -> dict:
    """Differences between the two sides' (log-probs, loss, grad norm) of the first mini-batch;
    log-probs are compared on real response tokens only."""
    (ours_logp, ours_loss, ours_norm), (theirs_logp, theirs_loss, theirs_norm) = ours, theirs
    mask_BR = np.asarray(batch.response_mask_PNR).reshape(-1, batch.response_PNR.shape[-1])
    diff_BR = np.abs(np.asarray(ours_logp) - theirs_logp)[mask_BR[:rows_mini]]
    ours_loss, ours_norm = float(ours_loss), float(ours_norm)
    return {
        "loss": (ours_loss, theirs_loss),
        "loss_diff": abs(ours_loss - theirs_loss),
        "grad_norm": (ours_norm, theirs_norm),
        "grad_norm_rel_diff": abs(ours_norm - theirs_norm) / theirs_norm,
        "logp_diff": float(diff_BR.max()),
    }


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    """GRPO train-step tokens/s of our jitted step vs the same loss in PyTorch on transformers.

    Both sides start from the same weights and train on the same rollout batch: vote and
    GRPO advantages, old log-probs recomputed and reference log-probs without grad, then one
    AdamW update (grad-clip 1.0, weight decay 0.01) per mini-batch of the PPO dual-clip loss,
    token-mean, plus the k3 KL term.
    """
    import torch

    torch.set_num_threads(cpu_cores())
    P, N, T, R = args.prompts, args.samples, args.prompt_len, args.response_len
    if N < 2:
        raise ValueError(f"--samples {N}: GRPO needs at least 2 responses per prompt")
    if P % args.mini_batch_prompts:
        raise ValueError(
            f"--prompts {P} does not split into mini-batches of --mini-batch-prompts "
            f"{args.mini_batch_prompts}"
        )
    hf = {**QWEN25_05B_HF, "num_hidden_layers": args.layers}
    if args.vocab:
        hf["vocab_size"] = args.vocab
    cfg = model_lib.ModelConfig.from_hf(hf, dtype="float32", param_dtype="float32")
    use_kl = args.kl_coef > 0
    rows_mini = args.mini_batch_prompts * N
    n_updates = P // args.mini_batch_prompts
    peak = measure_matmul_peak(dtype="float32")
    bandwidth = measure_memory_bandwidth()
    print(describe_machine("float32", peak, bandwidth), flush=True)

    params = jax.jit(model_lib.init_params, static_argnums=0)(cfg, jax.random.key(args.seed))
    policy, ref = torch_models(params, cfg, args.torch_attention, use_kl)
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
        **TORCH_ADAMW[args.torch_adamw],
    )  # fmt: skip
    batch = make_rollout(cfg, P, N, T, R, args.seed)
    rollout = torch_rollout(batch)
    torch_opts = dict(
        rows_mini=rows_mini, temperature=args.temperature, clip=0.2, dual_clip=3.0,
        kl_coef=args.kl_coef,
    )  # fmt: skip

    step_cfg = train.StepConfig(
        n_train=N, mini_batch_prompts=args.mini_batch_prompts, random_select=False,
        use_kl=use_kl, dual_clip=3.0, recompute_old_logp=True,
    )  # fmt: skip
    tx, lr_fn = train.make_optimizer(
        args.lr, n_updates, warmup_ratio=0.0, weight_decay=0.01, grad_clip=1.0,
        schedule="constant",
    )  # fmt: skip
    hyper = train.StepHyper.make(temperature=args.temperature, kl_coef=args.kl_coef)
    step = train.build_train_step(cfg, step_cfg, tx, lr_fn)
    state = train.init_state(jax.tree.map(jnp.copy, params), tx)  # the step donates it
    key = jax.random.key(args.seed)

    # Same loss on both sides: the first mini-batch at the initial weights, from each side's
    # pieces, then the whole first step (the warm-up run of each, below).
    check = jax.jit(our_first_minibatch, static_argnums=(0, 4, 5, 6))
    ours_check = check(cfg, params, batch, hyper, rows_mini, 3.0, use_kl)
    theirs_check = torch_first_minibatch(policy, ref, rollout, torch_opts)
    same = compare_first_minibatch(ours_check, theirs_check, batch, rows_mini)

    ref_params = params
    holder = {"state": state}

    def ours():
        holder["state"], metrics = step(holder["state"], ref_params, batch, key, hyper)
        return jax.block_until_ready((holder["state"], metrics))

    def theirs():
        return torch_train_step(policy, ref, optimizer, rollout, torch_opts)

    t0 = time.perf_counter()
    _, ours_metrics = ours()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs_losses = theirs()["loss"]
    theirs_first_s = time.perf_counter() - t0
    step_loss_diff = abs(float(ours_metrics["loss"]) - float(np.mean(theirs_losses)))

    probe = LoadProbe().start()
    best = time_best_interleaved(
        {"ttrl_jax": ours, "transformers": theirs},
        warmup=max(args.warmup - 1, 0),
        repeats=args.repeats,
    )
    probe.stop()
    # On a shared machine the peak measured at the start may have hit a busy moment.
    peak_after = measure_matmul_peak(dtype="float32")
    peak = max(peak, peak_after)

    flops = train_flops(cfg, P * N, T, R, with_ref=use_kl)
    tokens = P * N * (T + R)
    real_tokens = int(np.asarray(batch.prompt_mask_PT).sum()) * N + int(
        np.asarray(batch.response_mask_PNR).sum()
    )
    tied = "tied" if cfg.tie_embeddings else "untied"
    kl = f"k3 KL (coef {args.kl_coef:g}) to a reference copy" if use_kl else "no KL term"
    lines = [
        f"train: {cfg.model_type} L={cfg.num_layers} D={cfg.embed_dim} Q={cfg.num_heads} "
        f"K={cfg.num_kv_heads} H={cfg.head_dim} F={cfg.mlp_dim} V={cfg.vocab_size} {tied}, "
        "float32",
        f"  rollout: {P} prompts x {N} responses, prompt {T} + response {R} tokens; "
        f"{n_updates} AdamW update(s) of {args.mini_batch_prompts} prompt(s) x {N} responses; "
        f"{kl}; temperature {args.temperature:g}, lr {args.lr:g}",
        f"  tokens per step: {P * N} rows x {T + R} positions = {tokens} "
        f"({real_tokens} real, the rest padding that both sides compute)",
        "  matmul FLOPs per step: "
        + ", ".join(f"{name} {si(v, 'FLOP')}" for name, v in flops.items()),
        f"  matmul peak measured again after the timed runs: {si(peak_after, 'FLOP/s')}; "
        f"the higher one is used: {si(peak, 'FLOP/s')}",
        f"  ttrl_jax (jax.jit train_step; compile + first run {compile_s:.1f} s, excluded)",
        f"  transformers ({args.torch_attention} attention, {args.torch_adamw} "
        f"torch.optim.AdamW, {torch.get_num_threads()} threads; first run {theirs_first_s:.1f} s, "
        "excluded)",
    ]
    results: dict[str, Any] = {"flops": flops, "peak_flops": peak, "tokens": tokens}
    for name, seconds in best.items():
        rate = flops["total"] / seconds
        results[name] = {"seconds": seconds, "tokens_per_s": tokens / seconds, "flops": rate}
        lines.append(
            f"  {name:>12}: best of {args.repeats}: {seconds:.3f} s -> "
            f"{tokens / seconds:,.0f} tokens/s, {si(rate, 'FLOP/s')} ({rate / peak:.0%} of peak)"
        )
    ratio = best["transformers"] / best["ttrl_jax"]
    results.update(ratio=ratio, step_loss_diff=step_loss_diff, **same)
    lines += [
        f"  tokens/s ratio ttrl_jax / transformers: {ratio:.2f}x",
        f"  first mini-batch at the initial weights (ttrl_jax vs transformers): loss "
        f"{same['loss'][0]:.6f} vs {same['loss'][1]:.6f}, max |loss difference| "
        f"{same['loss_diff']:.2e}; grad norm {same['grad_norm'][0]:.4f} vs "
        f"{same['grad_norm'][1]:.4f} (relative difference {same['grad_norm_rel_diff']:.1e}); "
        f"max |log-prob difference| {same['logp_diff']:.2e}",
        f"  first whole step (warm-up runs), mean loss over its {n_updates} update(s): "
        f"|difference| {step_loss_diff:.2e}",
        f"  load: {probe.describe()}",
    ]
    print("\n".join(lines), flush=True)
    return results


# torch.optim.AdamW's implementations; on CPU the default is the per-tensor loop, several
# times slower than the fused kernel over the 10^8 embedding parameters.
TORCH_ADAMW = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}


def add_train_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="GRPO train-step tokens/s vs the same loss in PyTorch on transformers",
        description=run_train.__doc__,
    )
    p.add_argument("--layers", type=int, default=2, help="decoder layers (the real model has 24)")
    p.add_argument("--vocab", type=int, default=0, help="vocabulary size; 0 = Qwen2.5's 151936")
    p.add_argument("--prompts", type=int, default=2, help="P, prompts per rollout batch")
    p.add_argument("--samples", type=int, default=4, help="N, responses per prompt (>= 2)")
    p.add_argument("--prompt-len", type=int, default=32, help="T, left-padded prompt tokens")
    p.add_argument("--response-len", type=int, default=32, help="R, response tokens")
    p.add_argument(
        "--mini-batch-prompts", type=int, default=1, help="prompts per AdamW update (upstream: 1)"
    )
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--kl-coef", type=float, default=0.001, help="0 drops the KL term (both sides)")
    p.add_argument("--torch-attention", choices=("sdpa", "eager"), default="sdpa")
    p.add_argument("--torch-adamw", choices=tuple(TORCH_ADAMW), default="fused")
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed steps (the first compiles and is compared)"
    )
    p.add_argument("--repeats", type=int, default=2, help="timed steps; the best is reported")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run_train)


# ----------------------------------------------------------------------------- sample


@dataclasses.dataclass(frozen=True)
class SampleSize:
    """One grouped-rollout shape: P prompts of T tokens, N samples each, G new tokens."""

    prompts: int
    samples: int
    prompt_len: int
    new_tokens: int

    @classmethod
    def parse(cls, spec: str) -> SampleSize:
        """'8x16x128x256' -> P=8, N=16, T=128, G=256."""
        try:
            p, n, t, g = (int(x) for x in spec.lower().split("x"))
        except ValueError:
            raise ValueError(
                f"size {spec!r} is not of the form PxNxTxG (prompts x samples x prompt tokens x "
                "new tokens), e.g. 8x16x128x256"
            ) from None
        return cls(p, n, t, g)


def decode_step_cost(cfg: model_lib.ModelConfig, size: SampleSize) -> dict[str, float]:
    """Bytes and matmul FLOPs of one decode step (averaged over the G-1 steps) and of the prefill.

    Bytes are what any implementation must read: every weight once, plus the keys and values of
    the distinct context (each prompt once, each row's response so far). FLOPs count the dense
    layers, the vocabulary projection and attention over that context.
    """
    P, N, T, G = size.prompts, size.samples, size.prompt_len, size.new_tokens
    B = P * N
    D, Q, K, H, F, V = (
        cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
    )  # fmt: skip
    L, itemsize = cfg.num_layers, jnp.dtype(cfg.dtype).itemsize
    layer_params = L * (D * (Q + 2 * K) * H + Q * H * D + 3 * D * F)
    all_params = layer_params + V * D * (1 if cfg.tie_embeddings else 2)
    kv_per_token = 2 * L * K * H * itemsize
    response = (G - 1) / 2  # mean response length seen by the decode steps
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
    import transformers

    from ttrl_jax import sampler

    torch.set_num_threads(cpu_cores())
    cfg = model_lib.ModelConfig.from_hf(
        {**QWEN25_05B_HF, "num_hidden_layers": args.layers},
        dtype=args.dtype,
        param_dtype=args.dtype,
    )
    peak = measure_matmul_peak(dtype=args.dtype)
    bandwidth = measure_memory_bandwidth()
    print(describe_machine(args.dtype, peak, bandwidth), flush=True)

    params = jax.jit(model_lib.init_params, static_argnums=0)(cfg, jax.random.key(0))
    with tempfile.TemporaryDirectory() as tmp:
        folder = weights.save_hf(params, cfg, os.path.join(tmp, "model"), dtype=args.dtype)
        torch_model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=getattr(torch, args.dtype)
        ).eval()
    settings = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    sp = sampler.SamplingParams.make(**settings)
    print(
        f"sample: {cfg.model_type} L={cfg.num_layers} D={cfg.embed_dim} Q={cfg.num_heads} "
        f"K={cfg.num_kv_heads} H={cfg.head_dim} F={cfg.mlp_dim} V={cfg.vocab_size} "
        f"{'tied' if cfg.tie_embeddings else 'untied'}, {args.dtype}; "
        + ", ".join(f"{k} {v}" for k, v in settings.items())
        + "; no stop tokens (every row generates all G tokens)",
        flush=True,
    )
    results: dict[str, Any] = {"peak_flops": peak, "bandwidth": bandwidth}
    for spec in args.sizes:
        size = SampleSize.parse(spec)
        results[spec] = _sample_one_size(args, cfg, params, torch_model, sp, settings, size)
        results[spec].update(peak_flops=peak, bandwidth=bandwidth)
        _print_sample_size(cfg, size, results[spec], peak, bandwidth, args)
    return results


def _sample_one_size(args, cfg, params, torch_model, sp, settings, size: SampleSize) -> dict:
    import torch

    from ttrl_jax import sampler, token_draw

    P, N, T, G = size.prompts, size.samples, size.prompt_len, size.new_tokens
    prompt_PT = np.random.default_rng(0).integers(1, cfg.vocab_size, (P, T)).astype(np.int32)
    mask_PT = np.ones((P, T), bool)
    fn = sampler.compiled_sampler(cfg, N, G, (), 0)
    prompt_dev, mask_dev = jnp.asarray(prompt_PT), jnp.asarray(mask_PT)
    calls = [0]

    def ours():
        calls[0] += 1
        out = fn(params, prompt_dev, mask_dev, jax.random.key(calls[0]), sp)
        assert int(out.num_steps) == G - 1  # no stop tokens: every row ran to the end
        return out

    compile_s = time_once(ours)
    input_ids = torch.tensor(prompt_PT, dtype=torch.long)

    def theirs():
        with torch.inference_mode():
            out = torch_model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=True,
                max_new_tokens=G,
                min_new_tokens=G,
                num_return_sequences=N,
                pad_token_id=0,
                **settings,
            )
        assert out.shape == (P * N, T + G)

    # The sampling head alone (one step's B×V logits): our inverse-CDF draw vs Gumbel-max.
    z_BV = jax.random.normal(jax.random.key(0), (P * N, cfg.vocab_size)) * 3
    inverse_cdf = jax.jit(token_draw.sample_scaled)
    gumbel = jax.jit(lambda z, key: jax.random.categorical(key, z, axis=-1))
    head = time_best_interleaved(
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
    unembed_s = time_best(lambda: unembed(h_BD, embed_VD).block_until_ready(), repeats=5)
    probe = LoadProbe().start()
    best = time_best_interleaved(
        {"ttrl_jax": ours, "transformers": theirs}, warmup=0, repeats=args.repeats
    )
    probe.stop()
    return {
        "seconds": best,
        "compile_s": compile_s,
        "head": head,
        "unembed_s": unembed_s,
        "load": probe.describe(),
    }


def _print_sample_size(cfg, size: SampleSize, res: dict, peak: float, bandwidth: float, args):
    P, N, T, G = size.prompts, size.samples, size.prompt_len, size.new_tokens
    B = P * N
    cost = decode_step_cost(cfg, size)
    step_s = max(cost["step_flops"] / peak, cost["step_bytes"] / bandwidth)
    prefill_s = max(cost["prefill_flops"] / peak, cost["prefill_bytes"] / bandwidth)
    roof_s = prefill_s + (G - 1) * step_s
    bound = "matmul" if cost["step_flops"] / peak > cost["step_bytes"] / bandwidth else "bandwidth"
    lines = [
        f"  P={P} prompts x N={N} samples = {B} rows, prompt {T} tokens, {G} new tokens",
        f"    per decode step: {si(cost['step_bytes'], 'B')} to read, "
        f"{si(cost['step_flops'], 'FLOP')} -> {bound}-bound, roofline {step_s * 1e3:.1f} ms "
        f"(whole call incl. prefill: {roof_s:.2f} s = {B * G / roof_s:,.0f} tokens/s)",
    ]
    for name, seconds in res["seconds"].items():
        lines.append(
            f"    {name:>12}: best of {args.repeats}: {seconds:.2f} s -> "
            f"{B * G / seconds:,.1f} tokens/s, {roof_s / seconds:.0%} of the roofline"
        )
    ratio = res["seconds"]["transformers"] / res["seconds"]["ttrl_jax"]
    res["ratio"] = ratio
    res["roofline_fraction"] = roof_s / res["seconds"]["ttrl_jax"]
    head = res["head"]
    lines += [
        f"    tokens/s ratio ttrl_jax / transformers: {ratio:.2f}x "
        f"(ttrl_jax compile + first run {res['compile_s']:.1f} s, excluded)",
        f"    per step: ttrl_jax {res['seconds']['ttrl_jax'] / G * 1e3:.1f} ms (prefill included);"
        f" the unembedding product alone ({B}x{cfg.embed_dim} by {cfg.embed_dim}x"
        f"{cfg.vocab_size}, XLA's dot) {res['unembed_s'] * 1e3:.1f} ms = "
        f"{res['unembed_s'] / step_s:.0%} of the step's roofline",
        f"    sampling head per step ({B}x{cfg.vocab_size}): inverse-CDF "
        f"{head['inverse_cdf'] * 1e3:.1f} ms (with log-prob and entropy), Gumbel-max "
        f"{head['gumbel'] * 1e3:.1f} ms (token only)",
        f"    load: {res['load']}",
    ]
    print("\n".join(lines), flush=True)


def add_sample_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="grouped-rollout tokens/s vs transformers generate on Qwen2.5-0.5B shapes",
        description=run_sample.__doc__,
    )
    p.add_argument("--layers", type=int, default=4, help="decoder layers (the real model has 24)")
    p.add_argument(
        "--sizes",
        nargs="+",
        default=["1x1x128x128", "8x16x128x256"],
        help="PxNxTxG: prompts x samples per prompt x prompt tokens x new tokens",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each; the best is kept")
    p.set_defaults(run=run_sample)


# ----------------------------------------------------------------------------- entry point

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_forward_command,
    add_train_command,
    add_sample_command,
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ttrl_jax.bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(sub)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
