"""Log-probs of response tokens under a policy, for the train step: one forward of prompt +
response, then the vocabulary projection in chunks of positions.

Rows that answer the same prompt can share it (`group` = M rows per prompt): one row per prompt
holds the prompt once and its M responses after it, each response attending to the prompt and
to itself only (segments, model/attention.py), at positions continuing the prompt's. TTRL's
prompts are often longer than its responses, so a step then runs T + M·R positions per prompt
instead of M·(T + R); every log-prob is the one the row would have alone. Packed
(`packed_layout`), the row drops the padding too: the prompt's real tokens, then each response
to its own stop, then padding up to a length the host picks per step (`packed_length`), so the
forward follows the real tokens rather than the buckets.

The projection is the largest matmul of a step on large-vocabulary models; its chunks are
recomputed in the backward pass, so no B×R×V logits are kept for it.

Shape suffixes: ttrl_jax/__init__.py (C chunks of c positions).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ttrl_jax.model import decoder as model_lib
from ttrl_jax.model.config import ModelConfig
from ttrl_jax.rl import rewards


def sequence_inputs(prompt_BT, prompt_mask_BT, response_BR, response_mask_BR):
    """Prompt and response joined into one sequence: tokens, mask, positions."""
    tokens_BS = jnp.concatenate([prompt_BT, response_BR], axis=1)
    mask_BS = jnp.concatenate([prompt_mask_BT, response_mask_BR], axis=1)
    return tokens_BS, mask_BS, model_lib.left_pad_positions(mask_BS)


def response_logp(
    cfg: ModelConfig,
    params: Any,
    prompt_BT: jax.Array,
    prompt_mask_BT: jax.Array,
    response_BR: jax.Array,
    response_mask_BR: jax.Array,
    temperature: jax.Array,
    *,
    with_entropy: bool = False,
    with_self_certainty: bool = False,
    with_features: bool = False,
    logit_chunk: int = 512,
    group: int = 1,
    packed_len: int | None = None,
    dropout_key: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Log-probs (of logits / temperature) of the response tokens, plus optional extras.

    With `group` > 1, rows come in runs of `group` consecutive rows with the same prompt, which
    is then read once per run (see above); B must be a multiple of it.

    The vocabulary projection runs over chunks of positions, each recomputed in the backward
    pass, so the full B×R×V logits never exist at once, in the forward or the backward pass.

    `packed_len` (with `group` > 1) packs each shared row: the prompt's real tokens, then its
    responses at their real lengths, then padding up to `packed_len` positions, so the forward
    runs over the real tokens rather than T + M·R (`packed_layout`; `packed_length` picks it).

    `dropout_key` turns on the LoRA adapters' dropout (the loss's forward; model/lora.py).

    Returns:
      dict with "logp_BR", and "entropy_BR", "self_certainty_BR" (raw logits, temperature 1),
      "feature_BD" (mean final hidden state over the response) when asked for.
    """
    module = model_lib.Transformer(cfg)
    R = response_BR.shape[1]
    rngs = None if dropout_key is None else {"dropout": dropout_key}
    if group > 1:
        h_BRD = _shared_prompt_hidden(
            module, params, prompt_BT, prompt_mask_BT, response_BR, response_mask_BR, group, rngs,
            packed_len,
        )  # fmt: skip
    else:
        tokens_BS, mask_BS, positions_BS = sequence_inputs(
            prompt_BT, prompt_mask_BT, response_BR, response_mask_BR
        )
        h_BSD, _ = module.apply(
            params, tokens_BS, positions_BS, mask_BS, return_hidden=True, rngs=rngs
        )
        T = prompt_BT.shape[1]
        # Position t predicts token t + 1: responses are predicted from positions T-1 .. T+R-2.
        h_BRD = h_BSD[:, T - 1 : T + R - 1]
    chunk = min(logit_chunk, R)
    n_chunks = -(-R // chunk)
    pad = n_chunks * chunk - R
    h_CBcD = jnp.pad(h_BRD, ((0, 0), (0, pad), (0, 0)))
    h_CBcD = h_CBcD.reshape(h_BRD.shape[0], n_chunks, chunk, -1).swapaxes(0, 1)
    target_CBc = jnp.pad(response_BR, ((0, 0), (0, pad))).reshape(-1, n_chunks, chunk)
    target_CBc = target_CBc.swapaxes(0, 1)

    if not (with_entropy or with_self_certainty):
        head = {"params": {k: v for k, v in params["params"].items() if k in _HEAD}}
        logits_fn = lambda p, h: module.apply(p, h, method=model_lib.Transformer.unembed)
        token_logp = _token_logp_fn(logits_fn)
        outs = jax.lax.map(
            lambda xs: {"logp": token_logp(head, *xs, temperature)}, (h_CBcD, target_CBc)
        )
        return _unchunk(outs, h_BRD, response_mask_BR, R, with_features)

    @jax.checkpoint
    @jax.named_scope("unembed")
    def one_chunk(h_BcD, target_Bc):
        logits_BcV = module.apply(params, h_BcD, method=model_lib.Transformer.unembed)
        logp_BcV = jax.nn.log_softmax(logits_BcV / temperature, axis=-1)
        out = {"logp": jnp.take_along_axis(logp_BcV, target_Bc[..., None], axis=-1)[..., 0]}
        if with_entropy:
            out["entropy"] = -(jnp.exp(logp_BcV) * logp_BcV).sum(-1)
        if with_self_certainty:
            out["self_certainty"] = rewards.token_self_certainty(logits_BcV)
        return out

    outs = jax.lax.map(lambda xs: one_chunk(*xs), (h_CBcD, target_CBc))
    return _unchunk(outs, h_BRD, response_mask_BR, R, with_features)


_HEAD = ("embed", "lm_head")  # the params `Transformer.unembed` reads


def _shared_prompt_hidden(
    module, params, prompt_BT, prompt_mask_BT, response_BR, response_mask_BR, M, rngs=None,
    packed_len=None,
):  # fmt: skip
    """h_BRD of `response_logp` from one row per prompt: [prompt | response 1 | ... | M]."""
    (B, T), R = prompt_BT.shape, response_BR.shape[1]
    if B % M:
        raise ValueError(f"{B} rows do not split into groups of {M} rows per prompt")
    P = B // M
    prompt_PT, prompt_mask_PT = prompt_BT[::M], prompt_mask_BT[::M]
    if packed_len is not None:
        layout = packed_layout(prompt_mask_PT, response_mask_BR.reshape(P, M, R), packed_len)
        source_PS = jnp.concatenate([prompt_PT, response_BR.reshape(P, M * R)], axis=1)
        tokens_PS = jnp.take_along_axis(source_PS, layout.source_PS, axis=1)
        h_PSD, _ = module.apply(
            params, tokens_PS, layout.positions_PS, layout.mask_PS, return_hidden=True,
            segment_BT=layout.segment_PS, rngs=rngs,
        )  # fmt: skip
        slots = layout.slot_PMR.reshape(P, M * R, 1)  # response tokens in row order
        return jnp.take_along_axis(h_PSD, slots, axis=1).reshape(B, R, -1)
    tokens_PS = jnp.concatenate([prompt_PT, response_BR.reshape(P, M * R)], axis=1)
    mask_PS = jnp.concatenate([prompt_mask_PT, response_mask_BR.reshape(P, M * R)], axis=1)
    # Each response's positions continue its prompt's (left padding takes none).
    n_prompt_P1 = prompt_mask_PT.sum(-1, keepdims=True)
    positions_PS = jnp.concatenate(
        [model_lib.left_pad_positions(prompt_mask_PT), n_prompt_P1 + np.tile(np.arange(R), M)],
        axis=1,
    )
    segment_S = np.concatenate([np.zeros(T, np.int32), np.repeat(np.arange(1, M + 1), R)])
    segment_PS = jnp.broadcast_to(segment_S, (P, T + M * R))
    h_PSD, _ = module.apply(
        params, tokens_PS, positions_PS, mask_PS, return_hidden=True, segment_BT=segment_PS,
        rngs=rngs,
    )  # fmt: skip
    # Response m's first token is predicted by the prompt's last slot, token r by its own r - 1.
    slot_MR = T + np.arange(M)[:, None] * R + np.arange(R)[None, :] - 1
    slot_MR[:, 0] = T - 1
    return h_PSD[:, slot_MR].reshape(B, R, -1)


class PackedLayout(NamedTuple):
    """One packed row per prompt, S slots: [prompt | response 1 | ... | response M | padding],
    each piece at its real length (prompts are left-padded and responses right-padded in their
    T and R columns)."""

    source_PS: jax.Array  # column of [prompt_PT | response_PMR as M·R columns] at each slot
    positions_PS: jax.Array  # the prompt's 0.., each response continuing the prompt's
    segment_PS: jax.Array  # 0 prompt, m + 1 response m, -1 padding
    mask_PS: jax.Array  # False on padding
    slot_PMR: jax.Array  # the slot whose hidden state predicts response token (m, r)
    end_P: jax.Array  # slots the row's real tokens take (must be <= S)


def packed_layout(prompt_mask_PT, response_mask_PMR, S: int) -> PackedLayout:
    """Where each slot of the packed rows reads its token, and which slot predicts each
    response token. Masks are a prompt's suffix and a response's prefix (their padding)."""
    T = prompt_mask_PT.shape[1]
    R = response_mask_PMR.shape[2]
    n_P1 = prompt_mask_PT.sum(-1, dtype=jnp.int32)[:, None]
    length_PM = response_mask_PMR.sum(-1, dtype=jnp.int32)
    start_PM = n_P1 + jnp.cumsum(length_PM, axis=1) - length_PM
    end_P1 = n_P1 + length_PM.sum(-1, keepdims=True)
    s_1S = jnp.arange(S)[None]
    # A slot's response: the last one starting at or before it (an empty response starts where
    # the next one does and is skipped over).
    m_PS = jnp.clip((start_PM[:, None, :] <= s_1S[..., None]).sum(-1) - 1, 0, None)
    r_PS = s_1S - jnp.take_along_axis(start_PM, m_PS, axis=1)
    in_prompt_PS, pad_PS = s_1S < n_P1, s_1S >= end_P1
    source_PS = jnp.where(in_prompt_PS, T - n_P1 + s_1S, T + m_PS * R + r_PS)
    r_R = jnp.arange(R)
    # Response m's token 0 is predicted by the prompt's last slot, token r by its own r - 1.
    slot_PMR = jnp.where(r_R == 0, n_P1[..., None] - 1, start_PM[..., None] + r_R - 1)
    return PackedLayout(
        source_PS=jnp.where(pad_PS, 0, source_PS),
        positions_PS=jnp.where(pad_PS, 0, jnp.where(in_prompt_PS, s_1S, n_P1 + r_PS)),
        segment_PS=jnp.where(pad_PS, -1, jnp.where(in_prompt_PS, 0, m_PS + 1)),
        mask_PS=~pad_PS,
        slot_PMR=jnp.clip(slot_PMR, 0, S - 1),
        end_P=end_P1[:, 0],
    )


def packed_length(
    prompt_length_P: np.ndarray, length_PM: np.ndarray, multiple: int, limit: int
) -> int:
    """The packed row length for prompts of these real lengths and their trained responses':
    the longest row rounded up to `multiple`, at most `limit` (T + M·R, the unpacked row)."""
    need = int((np.asarray(prompt_length_P) + np.asarray(length_PM).sum(-1)).max())
    return min(-(-need // multiple) * multiple, limit)


def _token_logp_fn(logits_fn):
    """`(head, h_BcD, target_Bc, temperature) -> log softmax(logits_fn(head, h) / T)[target]`,
    with a backward pass that recomputes the logits once and forms their gradient in one pass.

    What `jax.checkpoint` around log_softmax gives, without its costs on CPU: there, XLA
    computes the forward logits twice (the forward's and the rematerialised copy, run
    concurrently) and differentiates log_softmax through a stored B×V intermediate.
    """

    def forward(head, h_BcD, target_Bc, temperature):
        with jax.named_scope("unembed"):
            z_BcV = logits_fn(head, h_BcD) / temperature
            shifted_BcV = z_BcV - jax.lax.stop_gradient(z_BcV.max(-1, keepdims=True))
            lse_Bc = jnp.log(jnp.exp(shifted_BcV).sum(-1))
            picked_Bc = jnp.take_along_axis(shifted_BcV, target_Bc[..., None], axis=-1)[..., 0]
            return picked_Bc - lse_Bc, z_BcV.max(-1) + lse_Bc

    @jax.custom_vjp
    def token_logp(head, h_BcD, target_Bc, temperature):
        return forward(head, h_BcD, target_Bc, temperature)[0]

    def fwd(head, h_BcD, target_Bc, temperature):
        logp_Bc, lse_Bc = forward(head, h_BcD, target_Bc, temperature)
        return logp_Bc, (head, h_BcD, target_Bc, temperature, lse_Bc)

    def bwd(residuals, g_Bc):
        head, h_BcD, target_Bc, temperature, lse_Bc = residuals
        with jax.named_scope("unembed"):
            logits_BcV, vjp = jax.vjp(logits_fn, head, h_BcD)
            p_BcV = jnp.exp(logits_BcV / temperature - lse_Bc[..., None])
            # d logp / d logits = (onehot(target) - softmax) / temperature
            is_target_BcV = jnp.arange(p_BcV.shape[-1]) == target_Bc[..., None]
            scale_Bc1 = (g_Bc / temperature)[..., None]
            d_head, d_h_BcD = vjp(jnp.where(is_target_BcV, 1.0 - p_BcV, -p_BcV) * scale_Bc1)
        no_target = np.zeros(target_Bc.shape, jax.dtypes.float0)
        return d_head, d_h_BcD, no_target, jnp.zeros_like(temperature)

    token_logp.defvjp(fwd, bwd)
    return token_logp


def _unchunk(outs, h_BRD, response_mask_BR, R, with_features):
    """Per-chunk outputs [C, B, c] back to [B, R], plus the mean response feature if asked."""
    result = {
        k + "_BR": v.swapaxes(0, 1).reshape(h_BRD.shape[0], -1)[:, :R] for k, v in outs.items()
    }
    if with_features:
        w_BR1 = response_mask_BR[..., None].astype(jnp.float32)
        result["feature_BD"] = (h_BRD.astype(jnp.float32) * w_BR1).sum(1) / jnp.maximum(
            w_BR1.sum(1), 1.0
        )
    return result
