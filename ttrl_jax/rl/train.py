"""The compiled TTRL train step: vote → rewards → select → advantages → GRPO mini-batch updates.

One jit does all of it, so a step is one dispatch: the host's only work between sampling and
the update is turning response text into answer ids (grading/clustering.py). In the order of a
step, with the pure functions of vote.py, rewards.py, advantages.py and losses.py:

    majority_P, ratio_P = majority_vote(answer_id_PN)            # over the N_vote group
    reward_PN = vote_reward(answer_id_PN, majority_P)            # or another reward
    index_PM = select_responses(key, P, N_vote, N_train, True)   # M = N_train
    reward_PM = gather_responses(reward_PN, index_PM)
    advantage_PM = group_advantages(reward_PM)                   # then optional reshaping
    loss, aux = grpo_loss(logp_new_BR, logp_old_BR, advantage_B, mask_BR, ...)

With LoRA (ModelConfig.lora) the state's params are the adapters alone and the frozen base comes
in where the KL reference does: the policy is the base under the adapters, the reference the base
without them (model/lora.py). Gradients and optimizer state exist for the adapters only.

Shape suffixes: the package's alphabet (ttrl_jax/__init__.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ttrl_jax import sharding as sharding_lib
from ttrl_jax.model import decoder as model_lib
from ttrl_jax.model import lora as lora_lib
from ttrl_jax.model.config import ModelConfig
from ttrl_jax.rl import advantages, logprobs, losses, rewards, vote
from ttrl_jax.rl.batch import StepBatch
from ttrl_jax.rl.logprobs import response_logp


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the train step (changing one recompiles)."""

    n_train: int  # responses per prompt used for the update (N_train <= N_vote)
    mini_batch_prompts: int = 1  # prompts per optimizer update (upstream: 1 × 32 responses)
    micro_batch_rows: int = 0  # rows per gradient-accumulation slice; 0 = whole mini-batch
    reward: rewards.Reward = "majority"
    random_select: bool = True  # random N_train subset (default) or the first N_train
    use_kl: bool = True  # k3 KL to the initial policy (needs ref params)
    use_entropy_bonus: bool = False
    dual_clip: float | None = 3.0
    recompute_old_logp: bool = True  # verl recomputes; False uses the sampler's log-probs
    share_prompts: bool = True  # each prompt read once for its M responses, where it fits
    ettrl: bool = False
    logit_chunk: int = 512  # positions unembedded at once (bounds the B×R×V logits)

    def __post_init__(self):
        if self.reward not in rewards.REWARDS:
            raise ValueError(f"unknown reward {self.reward!r}; choose one of {rewards.REWARDS}")
        if not losses.valid_dual_clip(self.dual_clip):
            raise ValueError(f"dual_clip={self.dual_clip} must be > 1 or None")


@flax.struct.dataclass
class StepHyper:
    """Traced scalars of the step (changing one never recompiles)."""

    temperature: jax.Array  # rollout temperature: log-probs are of logits / temperature
    clip_low: jax.Array
    clip_high: jax.Array
    kl_coef: jax.Array
    entropy_coef: jax.Array
    min_majority_ratio: jax.Array  # SRT prompt filter; 0 keeps every prompt with an answer
    ettrl_alpha: jax.Array
    lr_scale: jax.Array  # multiplies the schedule's learning rate (the collapse guard lowers it)

    @classmethod
    def make(cls, temperature=1.0, clip_low=0.2, clip_high=0.2, kl_coef=0.001,
             entropy_coef=0.0, min_majority_ratio=0.0, ettrl_alpha=0.0,
             lr_scale=1.0) -> StepHyper:  # fmt: skip
        f = lambda v: jnp.asarray(v, jnp.float32)
        return cls(f(temperature), f(clip_low), f(clip_high), f(kl_coef), f(entropy_coef),
                   f(min_majority_ratio), f(ettrl_alpha), f(lr_scale))  # fmt: skip


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32: optimizer updates done so far
    params: Any
    opt_state: Any


def make_optimizer(
    lr: float,
    total_updates: int,
    warmup_ratio: float = 0.03,
    min_lr_ratio: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    grad_clip: float | None = 1.0,
    schedule: str = "cosine",
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping; linear warmup then cosine, linear or constant."""
    warmup = int(warmup_ratio * total_updates)
    decay = max(total_updates - warmup, 1)
    end = lr * min_lr_ratio
    after = {
        "cosine": optax.cosine_decay_schedule(lr, decay, alpha=min_lr_ratio),
        "linear": optax.linear_schedule(lr, end, decay),
        "constant": optax.constant_schedule(lr),
    }
    if schedule not in after:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {sorted(after)}")
    lr_fn = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), after[schedule]], [warmup]
    )
    adamw = optax.adamw(lr_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    tx = adamw if grad_clip is None else optax.chain(optax.clip_by_global_norm(grad_clip), adamw)
    return tx, lr_fn


def init_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def trained_shapes(cfg: ModelConfig) -> Any:
    """ShapeDtypeStructs of what the step trains: the params, or with LoRA the adapters."""
    if cfg.lora is not None:
        return lora_lib.adapter_shapes(cfg)
    return jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))


def trained_shardings(cfg: ModelConfig, mesh) -> Any:
    """Their shardings in the train layout."""
    if cfg.lora is not None:
        return lora_lib.adapter_shardings(cfg, mesh, sharding_lib.TRAIN_RULES)
    return model_lib.param_shardings(cfg, mesh, sharding_lib.TRAIN_RULES)


def _policy(cfg: ModelConfig, params: Any, ref_params: Any) -> Any:
    """The variables of the policy's forward: the trained params, or the base under adapters."""
    return params if cfg.lora is None else lora_lib.with_adapters(ref_params, params)


# ----------------------------------------------------------------------------- the step


def _rows(x_PM, n_groups: int):
    """[P, M, ...] -> [n_groups, P*M/n_groups, ...] (consecutive rows stay together)."""
    flat = x_PM.reshape((-1,) + x_PM.shape[2:])
    return flat.reshape((n_groups, -1) + flat.shape[1:])


def split_rows(P: int, sc: StepConfig) -> tuple[int, int, int]:
    """(mini-batches, micro-batches per mini-batch, rows per micro-batch) of a P-prompt batch."""
    if P % sc.mini_batch_prompts:
        raise ValueError(
            f"batch of {P} prompts does not split into mini-batches of {sc.mini_batch_prompts}"
        )
    rows_mini = sc.mini_batch_prompts * sc.n_train
    rows_micro = sc.micro_batch_rows or rows_mini
    if rows_mini % rows_micro:
        raise ValueError(
            f"mini-batch of {rows_mini} rows does not split into micro-batches of {rows_micro}"
        )
    return P // sc.mini_batch_prompts, rows_mini // rows_micro, rows_micro


def prompt_group(cfg: ModelConfig, sc: StepConfig, T: int, R: int, rows_micro: int) -> int:
    """Rows per shared prompt in the step's log-prob passes (rl/logprobs.py): M, or 1.

    Sharing runs T + M·R positions per prompt instead of M·(T + R). Attention over them skips
    what the segments mask (another response's keys) only block by block, in the plain and
    chunked implementations; so on TPU, where long rows would leave the splash kernel, a prompt
    is shared only while its row fits one attention chunk. Micro-batches must hold whole prompts.
    """
    M = sc.n_train
    if not sc.share_prompts or M == 1 or rows_micro % M:
        return 1
    kernel = cfg.attention == "pallas" or (
        cfg.attention == "auto" and sharding_lib.active_platform() == "tpu"
    )
    return 1 if kernel and cfg.attention_chunk < T + M * R else M


class _Trained(NamedTuple):
    """The M responses per prompt the update trains on, each with its prompt."""

    prompt_PMT: jax.Array
    prompt_mask_PMT: jax.Array
    response_PMR: jax.Array
    response_mask_PMR: jax.Array


def train_step(
    state: TrainState,
    ref_params: Any,
    batch: StepBatch,
    key: jax.Array,
    hyper: StepHyper,
    packed_len: int | None = None,
    *,
    cfg: ModelConfig,
    step_cfg: StepConfig,
    tx: optax.GradientTransformation,
    lr_fn: optax.Schedule,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One TTRL step on a rollout batch; pure, meant to run under `jax.jit`.

    Args:
      state: params and optimizer state (fp32 master params; with LoRA, the adapters').
      ref_params: the initial policy for the k3 KL penalty (ignored unless step_cfg.use_kl);
        with LoRA (cfg.lora), the frozen base model, always: the policy is it under the
        adapters, the KL reference it alone.
      batch: the rollout and its answer ids (gold ids only for metrics).
      key: PRNG key for the response subset (and the adapters' dropout).
      hyper: traced scalars (temperature, clip range, coefficients).
      packed_len: with shared prompts, each prompt's row packed at real lengths into this many
        positions (`packed_length` computes it on the host from the batch); None: T + M·R.
        Static: each new length compiles the step once.
      cfg: model architecture.
      step_cfg: static settings.
      tx, lr_fn: the optax optimizer and its schedule (for the lr metric).

    Returns:
      (new state, dict of scalar device metrics).
    """
    sc = step_cfg
    P, N = batch.answer_id_PN.shape
    M = sc.n_train
    n_mini, n_micro, rows_micro = split_rows(P, sc)
    group = prompt_group(cfg, sc, batch.prompt_PT.shape[1], batch.response_PNR.shape[2], rows_micro)
    packed_len = packed_len if group > 1 else None

    # 1. Vote over all N_vote responses, then choose the N_train to learn from.
    majority_P, ratio_P = vote.majority_vote(batch.answer_id_PN)
    drawn_PN = vote.drawn(batch.answer_id_PN)
    index_PM = advantages.select_responses(key, P, N, M, sc.random_select, drawn_PN)
    take = functools.partial(advantages.gather_responses, index_PM=index_PM)
    answer_PM = take(batch.answer_id_PN)
    response_PMR = take(batch.response_PNR)
    rmask_PMR = take(batch.response_mask_PNR)
    prompt_PMT = jnp.broadcast_to(batch.prompt_PT[:, None], (P, M) + batch.prompt_PT.shape[1:])
    pmask_PMT = jnp.broadcast_to(
        batch.prompt_mask_PT[:, None], (P, M) + batch.prompt_mask_PT.shape[1:]
    )
    trained = _Trained(prompt_PMT, pmask_PMT, response_PMR, rmask_PMR)

    # 2. Old (rollout-policy) and reference log-probs, one forward per micro-batch, no grad.
    old, logp_old_PMR, logp_ref_PMR = _old_and_ref_logp(
        _policy(cfg, state.params, ref_params), ref_params, batch, trained, take, hyper, cfg, sc,
        rows_micro, group, packed_len,
    )  # fmt: skip

    # 3. Rewards and advantages.
    reward_PM = _rewards(batch, majority_P, answer_PM, rmask_PMR, old, take, sc.reward)
    advantage_PM = advantages.group_advantages(reward_PM)
    if sc.ettrl:
        entropy_PM = advantages.response_mean(take(batch.entropy_PNR), rmask_PMR)
        advantage_PM = advantages.ettrl_reshape(advantage_PM, entropy_PM, hyper.ettrl_alpha)
    keep_P = advantages.prompt_filter_mask(ratio_P, hyper.min_majority_ratio)
    loss_mask_PMR = rmask_PMR & (keep_P[:, None, None] > 0)

    # 4. Mini-batch updates; old log-probs stay those of the rollout policy throughout.
    minis = tuple(
        _rows(x, n_mini)
        for x in (*trained, loss_mask_PMR, logp_old_PMR, logp_ref_PMR, advantage_PM)
    )
    if _dropout(cfg):  # a key per mini-batch for the adapters' dropout masks
        minis += (jax.random.split(jax.random.fold_in(key, _DROPOUT), n_mini),)
    update = _mini_update(cfg, sc, hyper, tx, n_micro, rows_micro, group, ref_params, packed_len)
    (params, opt_state), mini_metrics = jax.lax.scan(update, (state.params, state.opt_state), minis)
    new_state = TrainState(step=state.step + n_mini, params=params, opt_state=opt_state)

    # 5. Metrics (gold ids are used here only).
    metrics = {k: v.mean() for k, v in mini_metrics.items()}
    metrics["ratio_first_minibatch"] = mini_metrics["ratio_mean"][0]
    metrics["lr"] = lr_fn(new_state.step - 1) * hyper.lr_scale
    # Non-finite if any parameter is: the run checks it before saving (one reduction).
    metrics["param_norm"] = optax.tree.norm(params)
    if packed_len is not None:  # rows longer than the host computed (a bug): the run stops
        metrics["packed_overflow"] = (_packed_need(trained) > packed_len).sum()
    metrics.update(rollout_metrics(batch, majority_P, ratio_P, reward_PM, advantage_PM, keep_P))
    return new_state, metrics


def _packed_need(trained: _Trained) -> jax.Array:
    """Positions each prompt's packed row needs: its prompt and trained responses, unpadded."""
    return trained.prompt_mask_PMT[:, 0].sum(-1) + trained.response_mask_PMR.sum((1, 2))


def packed_length(
    cfg: ModelConfig, sc: StepConfig, batch: StepBatch, key: jax.Array, multiple: int
) -> int | None:
    """On the host: the `packed_len` for `train_step(batch, key)`, or None where rows are not
    shared or `multiple` is 0 (off). The step's own choice of responses (the same key), so the
    rows hold the trained responses' real lengths; rounded up to `multiple` positions (each new
    length compiles the step once)."""
    P, N, R = batch.response_PNR.shape
    T = batch.prompt_PT.shape[1]
    if not multiple or prompt_group(cfg, sc, T, R, split_rows(P, sc)[2]) == 1:
        return None
    # Every process computes it from all prompts (the static length must agree).
    whole = sharding_lib.global_value
    drawn_PN = vote.drawn(whole(batch.answer_id_PN))
    index_PM = advantages.select_responses(key, P, N, sc.n_train, sc.random_select, drawn_PN)
    length_PN = whole(batch.response_mask_PNR).sum(-1)
    length_PM = np.take_along_axis(length_PN, np.asarray(index_PM), axis=1)
    return logprobs.packed_length(
        whole(batch.prompt_mask_PT).sum(-1), length_PM, multiple, T + sc.n_train * R
    )


def _logp_rows(
    params, trained: _Trained, hyper, cfg, sc: StepConfig, rows_micro, group, extras,
    packed_len=None,
):  # fmt: skip
    """`response_logp` of the trained rows under `params`, one micro-batch at a time; the
    self-certainty or the features too when `extras` and the reward needs them."""

    def one(xs):
        p, pm, r, rm = xs
        return response_logp(
            cfg, params, p, pm, r, rm, hyper.temperature,
            with_self_certainty=extras and sc.reward == "self_certainty",
            with_features=extras and sc.reward == "evol_novelty",
            logit_chunk=sc.logit_chunk, group=group, packed_len=packed_len,
        )  # fmt: skip

    P, M = trained.response_PMR.shape[:2]
    out = jax.lax.map(one, tuple(_rows(x, P * M // rows_micro) for x in trained))
    return {k: v.reshape((P, M) + v.shape[2:]) for k, v in out.items()}


def _old_and_ref_logp(
    params, ref_params, batch, trained, take, hyper, cfg, sc, rows_micro, group, packed_len
):
    """(the rollout policy's extras, its log-probs, the reference's log-probs), no gradient.

    (Named scopes label the pieces in profiles: `python -m ttrl_jax.bench train`.)
    """
    logp = functools.partial(
        _logp_rows, trained=trained, hyper=hyper, cfg=cfg, sc=sc, rows_micro=rows_micro,
        group=group, packed_len=packed_len,
    )  # fmt: skip
    with jax.named_scope("old_logp"):
        if sc.recompute_old_logp:
            old = logp(params, extras=True)
            logp_old_PMR = old["logp_BR"]
        else:
            needs_extras = sc.reward in ("self_certainty", "evol_novelty")
            old = logp(params, extras=True) if needs_extras else {}
            logp_old_PMR = take(batch.logp_PNR)
    logp_old_PMR = jax.lax.stop_gradient(logp_old_PMR)
    if sc.use_kl:
        with jax.named_scope("ref_logp"):
            logp_ref_PMR = jax.lax.stop_gradient(logp(ref_params, extras=False)["logp_BR"])
    else:
        logp_ref_PMR = jnp.zeros_like(logp_old_PMR)
    return old, logp_old_PMR, logp_ref_PMR


def _rewards(batch, majority_P, answer_PM, rmask_PMR, old, take, reward: str) -> jax.Array:
    """reward_PM of the trained responses, by the step's reward."""
    if reward == "majority":
        return take(rewards.vote_reward(batch.answer_id_PN, majority_P))
    if reward == "soft_frequency":
        return take(rewards.soft_frequency_reward(batch.answer_id_PN))
    if reward == "self_certainty":
        return advantages.response_mean(old["self_certainty_BR"], rmask_PMR)
    return rewards.evol_novelty_reward(old["feature_BD"], answer_PM, majority_P)


_DROPOUT = 1  # folded into the step's key for the adapters' dropout


def _dropout(cfg: ModelConfig) -> bool:
    return cfg.lora is not None and cfg.lora.dropout > 0


def _mini_update(
    cfg, sc: StepConfig, hyper, tx, n_micro: int, rows_micro: int, group: int, ref_params,
    packed_len: int | None,
):  # fmt: skip
    """The scan body of the mini-batch updates: gradients accumulated over micro-batches, one
    optimizer update, the mini-batch's loss and aux values."""

    def micro_loss(params, micro, num_tokens):
        p, pm, r, rm, lm, lo, lr, adv, *keys = micro
        out = response_logp(
            cfg, _policy(cfg, params, ref_params), p, pm, r, rm, hyper.temperature,
            with_entropy=sc.use_entropy_bonus, logit_chunk=sc.logit_chunk, group=group,
            packed_len=packed_len,
            dropout_key=keys[0][0] if keys else None,  # its first row's: one per micro-batch
        )  # fmt: skip
        return losses.grpo_loss(
            out["logp_BR"], lo, adv, lm,
            logp_ref_BR=lr if sc.use_kl else None,
            entropy_BR=out.get("entropy_BR"),
            clip_low=hyper.clip_low, clip_high=hyper.clip_high, dual_clip=sc.dual_clip,
            kl_coef=hyper.kl_coef if sc.use_kl else 0.0,
            entropy_coef=hyper.entropy_coef if sc.use_entropy_bonus else 0.0,
            num_tokens=num_tokens,
        )  # fmt: skip

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def mini_update(carry, mini):
        params, opt_state = carry
        num_tokens = mini[4].sum()
        if _dropout(cfg):  # a key per row, so they split into micro-batches as the rows do
            *mini, key = mini
            mini = (*mini, jax.random.split(key, n_micro * rows_micro))
        micros = tuple(x.reshape((n_micro, rows_micro) + x.shape[1:]) for x in mini)

        def accumulate(acc, micro):
            out = grad_fn(params, micro, num_tokens)
            with jax.named_scope("accumulate"):
                return jax.tree.map(jnp.add, acc, out), None

        # The first micro-batch starts the sums (0 + g = g exactly): no pass over a zero tree.
        total = grad_fn(params, jax.tree.map(lambda x: x[0], micros), num_tokens)
        if n_micro > 1:
            rest = jax.tree.map(lambda x: x[1:], micros)
            total, _ = jax.lax.scan(accumulate, total, rest)
        (loss, aux), grads = total
        with jax.named_scope("optimizer"):
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = tx.update(grads, opt_state, params)
            # AdamW's update is -lr * (adam + wd * p): scaling it scales the learning rate.
            updates = jax.tree.map(lambda u: u * hyper.lr_scale.astype(u.dtype), updates)
            params = optax.apply_updates(params, updates)
        return (params, opt_state), {"loss": loss, "grad_norm": grad_norm, **aux}

    return mini_update


# The step's metrics that compare with gold labels (measured only; absent without gold).
GOLD_METRICS = ("label_accuracy", "reward_accuracy", "rollout_accuracy", "pass_at_n_vote")


def rollout_metrics(batch: StepBatch, majority_P, ratio_P, reward_PM, advantage_PM, keep_P):
    """Per-step TTRL measurements over the drawn responses; gold-dependent ones average over
    prompts with a label."""
    answer_PN = batch.answer_id_PN
    drawn_PN = vote.drawn(answer_PN)
    n_drawn_P = jnp.maximum(drawn_PN.sum(-1), 1)
    has_gold_P = batch.gold_id_P >= 0
    n_gold = jnp.maximum(has_gold_P.sum(), 1)
    correct_PN = (answer_PN == batch.gold_id_P[:, None]) & has_gold_P[:, None]
    vote_PN = rewards.vote_reward(answer_PN, majority_P) > 0
    length_PN = batch.response_mask_PNR.sum(-1)
    gold_mean = lambda x_P: jnp.where(has_gold_P, x_P, 0.0).sum() / n_gold
    group_mean = lambda x_PN: jnp.where(drawn_PN, x_PN, 0).sum(-1) / n_drawn_P
    return {
        "majority_ratio": ratio_P.mean(),
        "answered": (answer_PN >= 0).sum() / n_drawn_P.sum(),
        "label_accuracy": gold_mean((majority_P == batch.gold_id_P).astype(jnp.float32)),
        # Fraction of responses whose vote reward equals the reward gold labels would give.
        "reward_accuracy": gold_mean(group_mean(vote_PN == correct_PN)),
        "rollout_accuracy": gold_mean(group_mean(correct_PN)),
        "pass_at_n_vote": gold_mean(correct_PN.any(-1).astype(jnp.float32)),
        "reward_mean": reward_PM.mean(),
        "advantage_abs_mean": jnp.abs(advantage_PM).mean(),
        "prompts_kept": keep_P.mean(),
        "votes_drawn": drawn_PN.sum(-1).mean(dtype=jnp.float32),
        "entropy": losses.masked_token_mean(
            batch.entropy_PNR, batch.response_mask_PNR & drawn_PN[..., None]
        ),
        "response_length": jnp.where(drawn_PN, length_PN, 0).sum() / n_drawn_P.sum(),
        "response_length_max": length_PN.max(),
    }


def build_train_step(
    cfg: ModelConfig,
    step_cfg: StepConfig,
    tx: optax.GradientTransformation,
    lr_fn: optax.Schedule,
    mesh=None,
    state_shardings: Any = None,
    ref_shardings: Any = None,
):
    """The jitted step, with explicit shardings and the state donated.

    Without a mesh it is a plain jit. With one, the state and reference params (with LoRA, the
    base) use the train rules table (FSDP over data + tensor over model) and batch rows are split
    over data.
    """
    fn = functools.partial(train_step, cfg=cfg, step_cfg=step_cfg, tx=tx, lr_fn=lr_fn)
    if mesh is None:
        return jax.jit(fn, donate_argnames=("state",), static_argnums=(5,))
    fn = sharding_lib.with_rules(fn, mesh, sharding_lib.TRAIN_RULES)
    rows = lambda ndim: sharding_lib.batch_sharding(mesh, ndim, sharding_lib.TRAIN_RULES)
    batch_shardings = StepBatch(
        prompt_PT=rows(2), prompt_mask_PT=rows(2), response_PNR=rows(3),
        response_mask_PNR=rows(3), logp_PNR=rows(3), entropy_PNR=rows(3),
        answer_id_PN=rows(2), gold_id_P=rows(1),
    )  # fmt: skip
    rep = sharding_lib.replicated(mesh)
    return jax.jit(
        fn,
        in_shardings=(state_shardings, ref_shardings, batch_shardings, rep, rep),
        out_shardings=(state_shardings, rep),
        donate_argnames=("state",),
        static_argnums=(5,),  # packed_len, passed by position (in_shardings take no kwargs)
    )


def state_shardings(cfg: ModelConfig, tx, mesh) -> TrainState:
    """TrainState shardings: params (or adapters) and their optimizer moments in the train
    layout."""
    p_sh = trained_shardings(cfg, mesh)
    rep = sharding_lib.replicated(mesh)
    p_shapes = trained_shapes(cfg)
    # Adam moments mirror the params and take their shardings; counts are replicated.
    opt_sh = optax.tree_map_params(
        tx,
        lambda _, sh: sh,
        jax.eval_shape(tx.init, p_shapes),
        p_sh,
        transform_non_params=lambda _: rep,
    )
    return TrainState(step=rep, params=p_sh, opt_state=opt_sh)
