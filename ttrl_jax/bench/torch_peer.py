"""The train step as upstream TTRL runs it in verl, on transformers' PyTorch model.

It is the benchmark's peer and the tests' parity oracle for `train.train_step`: the same vote,
GRPO advantage, PPO dual-clip loss with the k3 KL term, and one AdamW update per mini-batch,
written the way verl writes them (Counter vote, `log_softmax` then `gather`, `clip_grad_norm_`,
`torch.optim.AdamW`). The pieces are labelled with `torch.profiler.record_function` (old_logp,
ref_logp, unembed, optimizer) so a profile says where its time goes.

Shape suffixes: ttrl_jax/__init__.py.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from typing import Any

import numpy as np

from ttrl_jax.bench import models
from ttrl_jax.config.schema import Config
from ttrl_jax.model.config import ModelConfig
from ttrl_jax.rl.batch import StepBatch

# torch.optim.AdamW's implementations; on CPU the default is the per-tensor loop, several
# times slower than the fused kernel over a large embedding.
TORCH_ADAMW = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}


@dataclasses.dataclass(frozen=True)
class PeerOptions:
    """The settings of a run config that the PyTorch step follows."""

    rows_mini: int  # rows per optimizer update (mini_batch_prompts x n_train)
    n_train: int  # responses per prompt trained on: the first n_train (select=first)
    temperature: float
    clip: float
    dual_clip: float | None
    kl_coef: float
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    grad_clip: float | None

    @classmethod
    def from_config(cls, cfg: Config) -> PeerOptions:
        """The peer's options; raises ValueError naming a setting the peer does not implement."""
        o, t = cfg.optim, cfg.ttrl
        unsupported = {
            "ttrl.reward": t.reward != "majority",
            "ttrl.ettrl_alpha": t.ettrl_alpha != 0,
            "ttrl.min_majority_ratio": t.min_majority_ratio != 0,
            "optim.entropy_coef": o.entropy_coef != 0,
            "optim.clip_high (other than optim.clip_low)": o.clip_high != o.clip_low,
            "optim.micro_batch_size (other than the whole mini-batch)": (
                o.micro_batch_size not in (None, o.mini_batch_prompts * cfg.sample.n_train)
            ),
            "ttrl.select=random with n_train < n_vote": (
                t.select == "random" and cfg.sample.n_train < cfg.sample.n_vote
            ),
            "optim.schedule / warmup_ratio (other than constant, no warmup)": (
                o.schedule != "constant" or o.warmup_ratio != 0
            ),
        }
        bad = [name for name, is_bad in unsupported.items() if is_bad]
        if bad:
            raise ValueError(
                "the PyTorch peer implements upstream TTRL's step only; unsupported: "
                + ", ".join(bad)
            )
        return cls(
            rows_mini=o.mini_batch_prompts * cfg.sample.n_train,
            n_train=cfg.sample.n_train,
            temperature=cfg.sample.temperature,
            clip=o.clip_low,
            dual_clip=o.dual_clip,
            kl_coef=o.kl_coef,
            lr=o.lr,
            betas=(o.b1, o.b2),
            eps=o.eps,
            weight_decay=o.weight_decay,
            grad_clip=o.grad_clip,
        )


def torch_models(params: Any, cfg: ModelConfig, attention: str, use_kl: bool):
    """transformers' policy with our weights (through our own HF export) and a frozen copy as
    the reference, or None without the KL term."""
    policy = models.torch_model(params, cfg, "float32", attn_implementation=attention)
    policy.train()  # no dropout in these models: train mode changes nothing but is what verl runs
    ref = copy.deepcopy(policy).eval().requires_grad_(False) if use_kl else None
    return policy, ref


def torch_optimizer(policy, opts: PeerOptions, adamw: str = "fused"):
    """torch.optim.AdamW with the run's settings."""
    import torch

    return torch.optim.AdamW(
        policy.parameters(),
        lr=opts.lr,
        betas=opts.betas,
        eps=opts.eps,
        weight_decay=opts.weight_decay,
        **TORCH_ADAMW[adamw],
    )


def torch_rollout(batch: StepBatch, n_train: int) -> dict[str, Any]:
    """The rollout as verl's actor sees it: one row per trained response (the first n_train of
    each prompt), prompt + response joined; all answers are kept for the vote."""
    import torch

    P = batch.answer_id_PN.shape[0]
    prompt_BT = np.repeat(np.asarray(batch.prompt_PT), n_train, axis=0)
    pmask_BT = np.repeat(np.asarray(batch.prompt_mask_PT), n_train, axis=0)
    response_BR = np.asarray(batch.response_PNR)[:, :n_train].reshape(P * n_train, -1)
    rmask_BR = np.asarray(batch.response_mask_PNR)[:, :n_train].reshape(P * n_train, -1)
    mask_BS = torch.tensor(np.concatenate([pmask_BT, rmask_BR], axis=1), dtype=torch.long)
    return {
        "input_ids": torch.tensor(np.concatenate([prompt_BT, response_BR], 1), dtype=torch.long),
        "attention_mask": mask_BS,
        "position_ids": torch.clamp(torch.cumsum(mask_BS, dim=1) - 1, min=0),
        "responses": torch.tensor(response_BR, dtype=torch.long),
        "response_mask": torch.tensor(rmask_BR, dtype=torch.float32),
        "answer_id_PN": np.asarray(batch.answer_id_PN),
    }


def torch_advantages(answer_id_PN: np.ndarray, n_train: int):
    """Upstream TTRL's vote over all responses (Counter, first-seen wins ties), then verl's GRPO
    advantage over the n_train trained ones; flat, one per trained row."""
    import torch

    rewards = []
    for row in answer_id_PN.tolist():
        counts = Counter(a for a in row if a >= 0)
        majority = counts.most_common(1)[0][0] if counts else None
        rewards.append([float(a == majority) for a in row[:n_train]])
    reward_PM = torch.tensor(rewards)
    mean_P1, std_P1 = reward_PM.mean(1, keepdim=True), reward_PM.std(1, keepdim=True)
    return ((reward_PM - mean_P1) / (std_P1 + 1e-6)).reshape(-1)


def torch_response_logp(model, rows: dict[str, Any], temperature: float):
    """verl's log-probs: forward, logits / temperature, log_softmax, gather the responses.

    Only the R positions that predict a response token go through the lm head, as with
    transformers' `logits_to_keep`, and as ours does.
    """
    import torch

    R = rows["responses"].shape[1]
    h_BSD = model.model(
        input_ids=rows["input_ids"],
        attention_mask=rows["attention_mask"],
        position_ids=rows["position_ids"],
        use_cache=False,
    ).last_hidden_state
    with torch.profiler.record_function("unembed"):
        logits_BRV = model.lm_head(h_BSD[:, -R - 1 : -1])
        logp_BRV = torch.log_softmax(logits_BRV.float() / temperature, dim=-1)
        return logp_BRV.gather(-1, rows["responses"][..., None]).squeeze(-1)


def torch_grpo_loss(logp, old, ref, advantage_B, mask, opts: PeerOptions):
    """verl's PPO loss with dual-clip, token-mean, plus k3 ("low_var_kl") KL to the reference."""
    import torch

    token_mean = lambda x: (x * mask).sum() / mask.sum().clamp(min=1.0)
    advantage = advantage_B[:, None]
    ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
    clipped = torch.clamp(ratio, 1 - opts.clip, 1 + opts.clip)
    loss1 = torch.maximum(-advantage * ratio, -advantage * clipped)
    if opts.dual_clip is not None:
        loss2 = torch.minimum(-advantage * opts.dual_clip, loss1)
        loss1 = torch.where(advantage < 0, loss2, loss1)
    loss = token_mean(loss1)
    if ref is not None:
        d = torch.clamp(ref - logp, -20.0, 20.0)
        loss = loss + opts.kl_coef * token_mean(torch.clamp(torch.exp(d) - d - 1, -10.0, 10.0))
    return loss


def torch_minibatches(rollout: dict[str, Any], rows_mini: int) -> list[dict[str, Any]]:
    """The rollout's rows in consecutive mini-batches (a prompt's responses stay together)."""
    n_rows = rollout["responses"].shape[0]
    return [
        {k: v[i : i + rows_mini] for k, v in rollout.items() if k != "answer_id_PN"}
        for i in range(0, n_rows, rows_mini)
    ]


def torch_train_step(policy, ref, optimizer, rollout: dict[str, Any], opts: PeerOptions):
    """One step as upstream TTRL runs it in verl: old and reference log-probs without grad,
    then per mini-batch forward → loss → backward → clip_grad_norm_ → AdamW step.

    Returns:
      {"loss": the loss of each mini-batch, "grad_norm": the norm of each (before clipping)}.
    """
    import torch

    minis = torch_minibatches(rollout, opts.rows_mini)
    advantage_B = torch_advantages(rollout["answer_id_PN"], opts.n_train)
    temperature = opts.temperature
    with torch.no_grad():
        with torch.profiler.record_function("old_logp"):
            old = [torch_response_logp(policy, m, temperature) for m in minis]
        with torch.profiler.record_function("ref_logp"):
            refs = [
                None if ref is None else torch_response_logp(ref, m, temperature) for m in minis
            ]
    losses, norms = [], []
    for i, (mini, adv_B) in enumerate(zip(minis, advantage_B.split(opts.rows_mini))):
        optimizer.zero_grad(set_to_none=True)
        loss = torch_grpo_loss(
            torch_response_logp(policy, mini, temperature),
            old[i],
            refs[i],
            adv_B,
            mini["response_mask"],
            opts,
        )
        loss.backward()
        with torch.profiler.record_function("optimizer"):
            max_norm = float("inf") if opts.grad_clip is None else opts.grad_clip
            norms.append(float(torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm)))
            optimizer.step()
        losses.append(loss.item())
    return {"loss": losses, "grad_norm": norms}


def torch_first_minibatch(policy, ref, rollout: dict[str, Any], opts: PeerOptions):
    """Log-probs, loss and gradient norm of the first mini-batch at the initial weights, where
    the old and reference policies equal the policy (no update).

    The norm is summed in float64: torch's float32 norm of a 10^8-element gradient (the tied
    embedding) is off by about a percent, which would hide how close the gradients are.
    """
    import torch

    first, temperature = torch_minibatches(rollout, opts.rows_mini)[0], opts.temperature
    with torch.no_grad():
        old_BR = torch_response_logp(policy, first, temperature)
    policy.zero_grad(set_to_none=True)
    loss = torch_grpo_loss(
        torch_response_logp(policy, first, temperature),
        old_BR,
        None if ref is None else old_BR,
        torch_advantages(rollout["answer_id_PN"], opts.n_train)[: opts.rows_mini],
        first["response_mask"],
        opts,
    )
    loss.backward()
    norm = sum(float(p.grad.double().square().sum()) for p in policy.parameters()) ** 0.5
    policy.zero_grad(set_to_none=True)
    return old_BR.numpy(), loss.item(), norm
