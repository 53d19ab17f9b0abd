"""`bench train`: the compiled TTRL train step against upstream's step in PyTorch, same weights.

Our step is built from a run `Config` through `from_config.train_parts`, so it is the program a run
compiles; the peer (torch_peer.py) follows the same config. Each size is a rollout of
P prompts × M trained responses × (T prompt + R response) tokens.

Shape suffixes: ttrl_jax/__init__.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ttrl_jax.bench import machine, models, profile, torch_peer
from ttrl_jax.bench.machine import si
from ttrl_jax.config import load as config_lib
from ttrl_jax.config.schema import Config
from ttrl_jax.model.config import ModelConfig
from ttrl_jax.rl import advantages, logprobs, losses, rewards, train, vote
from ttrl_jax.rl.batch import StepBatch
from ttrl_jax.run import from_config


@dataclasses.dataclass(frozen=True)
class TrainSize:
    """One rollout batch: P prompts × M trained responses, T prompt + R response tokens."""

    prompts: int
    responses: int
    prompt_len: int
    response_len: int

    @classmethod
    def parse(cls, spec: str) -> TrainSize:
        """'8x8x64x64' -> P=8, M=8, T=64, R=64."""
        form = (
            "PxMxTxR (prompts x trained responses per prompt x prompt tokens x response tokens), "
            "e.g. 8x8x64x64"
        )
        size = cls(*models.parse_size(spec, form))
        if size.responses < 2 or min(size.prompts, size.prompt_len, size.response_len) < 1:
            raise ValueError(f"size {spec!r}: GRPO needs M >= 2 responses; P, T, R >= 1")
        return size


# What bench fixes in the run config, before --set: the peer trains on the first n_train
# responses at a constant learning rate (the lr's value does not change the work).
BASE_OVERRIDES = ("ttrl.select=first", "optim.schedule=constant", "optim.warmup_ratio=0")


def run_config(size: TrainSize, overrides: list[str]) -> Config:
    """The run config of one size: the defaults (upstream's: kl_coef 0.001, mini-batches of one
    prompt, dual-clip 3, AdamW), bench's fixed settings, the user's --set, then the size."""
    sized = [
        f"data.batch_prompts={size.prompts}",
        f"sample.n_vote={size.responses}",
        f"sample.n_train={size.responses}",
    ]
    return config_lib.load_config(None, [*BASE_OVERRIDES, *overrides, *sized])


def train_flops(
    cfg: ModelConfig,
    prompts: int,
    responses: int,
    prompt_len: int,
    response_len: int,
    *,
    with_ref: bool,
    with_old: bool = True,
    shared: bool = False,
    packed_len: int | None = None,
) -> dict[str, int]:
    """Model matmul FLOPs of one GRPO train step over `prompts` x `responses` (M) rows of prompt
    + response, or with `shared` prompts (rl/logprobs.py) one row of prompt + M responses each
    (`packed_len` positions when packed at real lengths).

    Counted per position (padding included: both sides compute every position): the decoder's
    non-embedding matmuls (2 FLOPs per weight) and the causal S×S attention products
    (S = prompt + response) counted in full; the lm head only at response positions (the only
    logits the loss needs, and the only ones either side computes). A forward is 1×, a forward +
    backward 3×. The step is one forward + backward of the policy, a no-grad forward for the old
    log-probs when they are recomputed, and one of the reference policy when the KL term is on.
    Not counted: the embedding gather and its scatter-add gradient, norms, softmaxes, the
    optimizer, and our recomputation of the lm head in the backward pass (`jax.checkpoint`
    on the logit chunks), so ours does more arithmetic than it is credited with.
    """
    if shared:
        rows, S = prompts, packed_len or prompt_len + responses * response_len
    else:
        rows, S = prompts * responses, prompt_len + response_len
    forward = (
        2 * cfg.num_layers * models.layer_matmul_params(cfg) * rows * S
        + cfg.num_layers * 2 * 2 * rows * cfg.num_heads * S * S * cfg.head_dim
        + 2 * cfg.embed_dim * cfg.vocab_size * prompts * responses * response_len
    )
    flops = {"policy forward + backward": 3 * forward}
    if with_old:
        flops["old log-prob forward"] = forward
    if with_ref:
        flops["reference forward"] = forward
    flops["total"] = sum(flops.values())
    return flops


def make_rollout(cfg: ModelConfig, P: int, N: int, T: int, R: int, seed: int = 0) -> StepBatch:
    """A synthetic rollout batch with realistic padding and answers that split every group.

    Prompts are left-padded to T (real length in [T/2, T]), responses end somewhere in
    [R/2, R]; per prompt the last max(N // 4, 1) responses give answer 1 and the others answer
    0, so the vote picks 0 and every group has rewards of both kinds (non-zero advantages).
    The rollout log-probs are zeros: `with_rollout_logp` fills in the policy's own.
    """
    rng = np.random.default_rng(seed)
    prompt_len_P1 = rng.integers(T // 2 + 1, T + 1, (P, 1))
    response_len_PN1 = rng.integers(R // 2 + 1, R + 1, (P, N, 1))
    answer_id_PN = np.broadcast_to(np.arange(N) >= N - max(N // 4, 1), (P, N))
    return StepBatch(
        prompt_PT=jnp.asarray(rng.integers(0, cfg.vocab_size, (P, T)), jnp.int32),
        prompt_mask_PT=jnp.asarray(np.arange(T)[None] >= T - prompt_len_P1),
        response_PNR=jnp.asarray(rng.integers(0, cfg.vocab_size, (P, N, R)), jnp.int32),
        response_mask_PNR=jnp.asarray(np.arange(R)[None, None] < response_len_PN1),
        logp_PNR=jnp.zeros((P, N, R), jnp.float32),
        entropy_PNR=jnp.zeros((P, N, R), jnp.float32),
        answer_id_PN=jnp.asarray(answer_id_PN, jnp.int32),
        gold_id_P=jnp.zeros((P,), jnp.int32),
    )


@functools.partial(jax.jit, static_argnums=0)
def with_rollout_logp(cfg, params, batch: StepBatch, temperature) -> StepBatch:
    """The batch with the log-probs the sampler would have returned: the policy's own."""
    P, N, R = batch.response_PNR.shape
    prompt_BT = jnp.repeat(batch.prompt_PT, N, axis=0)
    pmask_BT = jnp.repeat(batch.prompt_mask_PT, N, axis=0)
    logp_BR = logprobs.response_logp(
        cfg, params, prompt_BT, pmask_BT, batch.response_PNR.reshape(P * N, R),
        batch.response_mask_PNR.reshape(P * N, R), temperature,
    )["logp_BR"]  # fmt: skip
    return batch.replace(logp_PNR=logp_BR.reshape(P, N, R))


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def our_first_minibatch(cfg, params, batch: StepBatch, step_cfg, rows_mini, hyper):
    """Log-probs, loss and grad norm of the first mini-batch update, built from the pieces the
    train step uses (`response_logp`, the vote, `grpo_loss`) at the initial params, where the
    old and reference policies equal the policy."""
    M = step_cfg.n_train
    first = lambda x_PN: x_PN[:, :M].reshape((-1,) + x_PN.shape[2:])[:rows_mini]
    prompt_BT = jnp.repeat(batch.prompt_PT, M, axis=0)[:rows_mini]
    pmask_BT = jnp.repeat(batch.prompt_mask_PT, M, axis=0)[:rows_mini]
    response_BR, rmask_BR = first(batch.response_PNR), first(batch.response_mask_PNR)
    logp_fn = lambda p: logprobs.response_logp(
        cfg, p, prompt_BT, pmask_BT, response_BR, rmask_BR, hyper.temperature
    )["logp_BR"]
    old_BR = jax.lax.stop_gradient(logp_fn(params))
    majority_P, _ = vote.majority_vote(batch.answer_id_PN)
    reward_PN = rewards.vote_reward(batch.answer_id_PN, majority_P)
    advantage_B = advantages.group_advantages(reward_PN[:, :M]).reshape(-1)[:rows_mini]

    def loss_fn(p):
        loss, _ = losses.grpo_loss(
            logp_fn(p), old_BR, advantage_B, rmask_BR,
            logp_ref_BR=old_BR if step_cfg.use_kl else None,
            clip_low=hyper.clip_low, clip_high=hyper.clip_high, dual_clip=step_cfg.dual_clip,
            kl_coef=hyper.kl_coef if step_cfg.use_kl else 0.0,
        )  # fmt: skip
        return loss

    loss, grads = jax.value_and_grad(loss_fn)(params)
    return old_BR, loss, optax.tree.norm(grads)


def compare_first_minibatch(ours, theirs, batch: StepBatch, opts) -> dict:
    """Differences between the two sides' (log-probs, loss, grad norm) of the first mini-batch;
    log-probs are compared on real response tokens only."""
    (ours_logp, ours_loss, ours_norm), (theirs_logp, theirs_loss, theirs_norm) = ours, theirs
    mask_BR = np.asarray(batch.response_mask_PNR)[:, : opts.n_train]
    mask_BR = mask_BR.reshape(-1, mask_BR.shape[-1])[: opts.rows_mini]
    diff_BR = np.abs(np.asarray(ours_logp) - theirs_logp)[mask_BR]
    ours_loss, ours_norm = float(ours_loss), float(ours_norm)
    return {
        "loss": (ours_loss, theirs_loss),
        "loss_diff": abs(ours_loss - theirs_loss),
        "grad_norm": (ours_norm, theirs_norm),
        "grad_norm_rel_diff": abs(ours_norm - theirs_norm) / theirs_norm,
        "logp_diff": float(diff_BR.max()),
    }


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    """GRPO train-step tokens/s of our compiled step vs upstream's step in PyTorch on
    transformers, same weights, same rollout, same config: vote and GRPO advantages, old and
    reference log-probs without grad (as the config's step does them), then one AdamW update
    per mini-batch of the PPO dual-clip loss, token-mean, plus the k3 KL term."""
    import torch

    torch.set_num_threads(machine.cpu_cores())
    sizes = [TrainSize.parse(s) for s in args.sizes]
    configs = [run_config(size, args.set) for size in sizes]
    if configs[0].model.dtype != "float32" or configs[0].model.param_dtype != "float32":
        raise ValueError("bench train compares float32 steps; drop model.dtype/param_dtype")
    machine_ = machine.Machine.measure("float32")
    print(machine_.describe(), flush=True)
    cfg, params = models.load(args, "float32", seed=args.seed)
    print(f"train: {models.describe(cfg)}, float32", flush=True)
    results: dict[str, Any] = {}
    policy = ref = None
    for spec, size, run_cfg in zip(args.sizes, sizes, configs):
        opts = torch_peer.PeerOptions.from_config(run_cfg)
        if policy is None or (ref is None) != (run_cfg.optim.kl_coef == 0):
            policy, ref = torch_peer.torch_models(
                params, cfg, args.torch_attention, run_cfg.optim.kl_coef > 0
            )
            initial = {k: v.clone() for k, v in policy.state_dict().items()}
        policy.load_state_dict(initial)  # every size starts from the same weights on both sides
        res = _one_size(args, cfg, params, policy, ref, size, run_cfg, opts)
        results[spec] = res
        machine_ = machine_.remeasured()
        _report(cfg, size, run_cfg, res, machine_, args)
    return results


def _one_size(args, cfg, params, policy, ref, size: TrainSize, run_cfg, opts) -> dict[str, Any]:
    P, M, T, R = size.prompts, size.responses, size.prompt_len, size.response_len
    tp = from_config.train_parts(run_cfg, total_steps=1)
    step = train.build_train_step(cfg, tp.step_cfg, tp.tx, tp.lr_fn)
    batch = make_rollout(cfg, P, M, T, R, args.seed)
    if not tp.step_cfg.recompute_old_logp:
        batch = with_rollout_logp(cfg, params, batch, tp.hyper.temperature)
    optimizer = torch_peer.torch_optimizer(policy, opts, args.torch_adamw)
    rollout = torch_peer.torch_rollout(batch, opts.n_train)
    key = jax.random.key(args.seed)
    packed_len = train.packed_length(cfg, tp.step_cfg, batch, key, run_cfg.optim.pack_multiple)
    say = lambda line: print(f"  {P}x{M}x{T}x{R}: {line}", flush=True)  # never silent for long
    # Same loss on both sides: the first mini-batch at the initial weights, from each side's
    # pieces; then the whole first step (the first warm-up run of each, below).
    say("the first mini-batch's loss and gradient on both sides")
    ours_check = our_first_minibatch(cfg, params, batch, tp.step_cfg, opts.rows_mini, tp.hyper)
    same = compare_first_minibatch(
        ours_check, torch_peer.torch_first_minibatch(policy, ref, rollout, opts), batch, opts
    )
    holder = {"state": train.init_state(jax.tree.map(jnp.copy, params), tp.tx)}
    say("compiling the train step")
    t0 = time.perf_counter()
    compiled = step.lower(holder["state"], params, batch, key, tp.hyper, packed_len).compile()
    compile_s = time.perf_counter() - t0
    say(f"compiled in {compile_s:.1f} s; the first step of each side (compared, not timed)")

    def ours():
        holder["state"], metrics = compiled(holder["state"], params, batch, key, tp.hyper)
        return jax.block_until_ready((holder["state"], metrics))

    def theirs():
        return torch_peer.torch_train_step(policy, ref, optimizer, rollout, opts)

    t0 = time.perf_counter()
    ours_metrics = ours()[1]
    t1 = time.perf_counter()
    theirs_first = theirs()
    first_s = {"ttrl_jax": t1 - t0, "transformers": time.perf_counter() - t1}
    say(", ".join(f"first step of {name}: {s:.1f} s" for name, s in first_s.items()))
    step_loss_diff = abs(float(ours_metrics["loss"]) - float(np.mean(theirs_first["loss"])))
    timed = profile.race(ours, theirs, compiled.as_text(), args)
    real_tokens = int(np.asarray(batch.prompt_mask_PT).sum()) * M + int(
        np.asarray(batch.response_mask_PNR).sum()
    )
    return {
        "race": timed,
        "compile_s": compile_s,
        "first_s": first_s,
        "step_cfg": tp.step_cfg,
        "packed_len": packed_len,
        "real_tokens": real_tokens,
        "step_loss_diff": step_loss_diff,
        **same,
    }


def _report(cfg, size: TrainSize, run_cfg, res, machine_, args) -> None:
    P, M, T, R = size.prompts, size.responses, size.prompt_len, size.response_len
    sc, o = res["step_cfg"], run_cfg.optim
    use_kl = o.kl_coef > 0
    shared = train.prompt_group(cfg, sc, T, R, train.split_rows(P, sc)[2]) > 1
    ours = train_flops(
        cfg, P, M, T, R, with_ref=use_kl, with_old=sc.recompute_old_logp, shared=shared,
        packed_len=res["packed_len"],
    )  # fmt: skip
    flops = {"ttrl_jax": ours, "transformers": train_flops(cfg, P, M, T, R, with_ref=use_kl)}
    tokens = P * M * (T + R)
    row = res["packed_len"] or T + M * R
    ours_positions = P * row if shared else tokens
    n_updates = P // o.mini_batch_prompts
    old = "recomputed" if sc.recompute_old_logp else "the rollout's (exact: not recomputed)"
    kl = f"k3 KL (coef {o.kl_coef:g}) to a reference copy" if use_kl else "no KL term"
    lines = [
        f"  P={P} prompts x M={M} responses, prompt {T} + response {R} tokens; {n_updates} "
        f"AdamW update(s) of {o.mini_batch_prompts} prompt(s) x {M} responses "
        f"(micro-batches of {sc.micro_batch_rows or o.mini_batch_prompts * M} rows); {kl}; "
        f"old log-probs {old}; temperature {run_cfg.sample.temperature:g}, lr {o.lr:g}",
        f"    tokens per step: {P * M} rows x {T + R} positions = {tokens} "
        f"({res['real_tokens']} real, the rest padding); ttrl_jax "
        + (
            f"reads each prompt once: {P} rows x {row} positions = {ours_positions}"
            + (" (packed at real lengths)" if res["packed_len"] else "")
            if shared
            else "runs the same rows"
        ),
        "    matmul FLOPs per step: "
        + "; ".join(
            f"{name} " + ", ".join(f"{k} {si(v, 'FLOP')}" for k, v in f.items())
            for name, f in flops.items()
        ),
        f"    matmul peak (the higher of two measurements): {si(machine_.peak_flops, 'FLOP/s')}",
        f"    ttrl_jax: compile {res['compile_s']:.1f} s, first step "
        f"{res['first_s']['ttrl_jax']:.1f} s; transformers ({args.torch_attention} attention, "
        f"{args.torch_adamw} AdamW): first step {res['first_s']['transformers']:.1f} s "
        "(excluded)",
    ]
    timed = res["race"]
    lines.append(f"    best of {args.repeats} steps each (after the compared first step):")
    total = {name: f["total"] for name, f in flops.items()}
    lines += timed.rate_lines(res["real_tokens"], "real tokens", total, machine_.peak_flops, "    ")
    res["ratio"] = timed.ratio
    res["peak_fraction"] = total["ttrl_jax"] / timed.seconds["ttrl_jax"] / machine_.peak_flops
    lines += [
        f"    first mini-batch at the initial weights: loss {res['loss'][0]:.6f} vs "
        f"{res['loss'][1]:.6f} (|difference| {res['loss_diff']:.2e}); grad norm "
        f"{res['grad_norm'][0]:.4f} vs {res['grad_norm'][1]:.4f} (relative difference "
        f"{res['grad_norm_rel_diff']:.1e}); max |log-prob difference| {res['logp_diff']:.2e}",
        f"    first whole step, mean loss over its {n_updates} update(s): |difference| "
        f"{res['step_loss_diff']:.2e}",
    ]
    lines += timed.tail_lines("    ")
    print("\n".join(lines), flush=True)


def add_train_command(sub: argparse._SubParsersAction) -> None:
    sizes = ["8x8x64x64", "8x8x128x256"], "PxMxTxR: prompts x trained x prompt x response tokens"
    help = "GRPO train-step tokens/s vs upstream's step in PyTorch on transformers"
    p = models.add_command(sub, "train", help, run_train, sizes)
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="run-config overrides, e.g. optim.kl_coef=0 optim.mini_batch_prompts=2",
    )
    p.add_argument("--torch-attention", choices=("sdpa", "eager"), default="sdpa")
    p.add_argument("--torch-adamw", choices=tuple(torch_peer.TORCH_ADAMW), default="fused")
    profile.add_race_args(p, repeats=2, warmup=0)
    p.add_argument("--seed", type=int, default=0)
