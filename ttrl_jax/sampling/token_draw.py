"""The sampling head: one token per row from temperature-scaled, filtered logits, without sorting.

Shape letters (besides the package's B rows and V vocabulary, ttrl_jax/__init__.py): the
vocabulary is viewed as C blocks of b logits each; W is a number of candidate blocks and X of
candidate logits (the largest ones, for the top-k and top-p thresholds).
"""

from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp

_NEG = -1e30  # floor for scaled logits: keeps exp() and e·(z - m) finite (no inf, no NaN)
_CANDIDATES = 64  # top-k / top-p fast path: exact while the answer lies in the 64 largest logits
_BISECT_STEPS = 32  # one step per bit of a float32


@flax.struct.dataclass
class SamplingParams:
    """Traced sampling settings: changing their values never recompiles.

    temperature 0 is greedy (filters ignored); top_k 0, top_p 1 and min_p 0 are off. Filters
    apply in the order of transformers' `generate`: temperature, top-k, top-p (over the top-k
    renormalised distribution), min-p (relative to the most likely token, so the order does not
    matter for it).
    """

    temperature: jax.Array  # float32 scalar
    top_p: jax.Array  # float32 scalar
    top_k: jax.Array  # int32 scalar
    min_p: jax.Array  # float32 scalar

    @classmethod
    def make(
        cls, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
    ) -> SamplingParams:
        """Checks plain-number settings and wraps them as device scalars."""
        if isinstance(temperature, (int, float)) and not (
            math.isfinite(temperature) and temperature >= 0
        ):
            raise ValueError(f"temperature={temperature} must be finite and >= 0 (0 = greedy)")
        if isinstance(top_p, (int, float)) and not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p} must be in (0, 1] (1 = off)")
        if isinstance(top_k, (int, float)) and (top_k < 0 or int(top_k) != top_k):
            raise ValueError(f"top_k={top_k} must be an integer >= 0 (0 = off)")
        if isinstance(min_p, (int, float)) and not 0 <= min_p <= 1:
            raise ValueError(f"min_p={min_p} must be in [0, 1] (0 = off)")
        return cls(
            temperature=jnp.asarray(temperature, jnp.float32),
            top_p=jnp.asarray(top_p, jnp.float32),
            top_k=jnp.asarray(top_k, jnp.int32),
            min_p=jnp.asarray(min_p, jnp.float32),
        )


def sample_token(
    logits_BV: jax.Array, key: jax.Array, sampling: SamplingParams
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draws one token per row from the filtered, temperature-scaled distribution.

    Exact (up to float32 rounding) and without sorting the vocabulary:
      - the vocabulary is viewed as [V/b, b] blocks; a row's draw picks a block by inverse CDF
        over block masses, then a token inside it by inverse CDF, with two uniforms per row.
        Two levels keep float32 resolution relative to each level's own mass. (Gumbel-max
        needs V random numbers per row: `bench sample` measured it 3x slower than this whole
        function for one row and 10x slower for 128 rows, on CPU.)
      - filters become one logit threshold per row, `keep z >= tau`: top-k's k-th largest
        logit (ties kept, as transformers does), top-p's smallest prefix of the sorted
        distribution reaching p (ties at the boundary kept), min-p's m + log(min_p).
        They are computed only when a filter is on (`lax.cond`), from the 64 largest logits
        (exact whenever the answer lies among them), else by bisection over float bits.
      - greedy (temperature 0) is the first index of the largest logit.

    Args:
      logits_BV: raw logits (any float dtype).
      key: PRNG key for this step, one for all rows (each row draws its own uniforms from it)
        or one per row ([B] keys: row b's draw depends on keys[b] only).
      sampling: temperature / top-p / top-k / min-p.

    Returns:
      (token_B int32, logp_B, entropy_B): log-prob and entropy of softmax(logits / temperature)
      (raw logits when greedy), unfiltered, float32.
    """
    return sample_scaled(scale_logits(logits_BV, sampling), key, sampling)


def scale_logits(logits_BV: jax.Array, sampling: SamplingParams) -> jax.Array:
    """Logits / temperature in float32 (raw logits when greedy), floored to stay finite."""
    greedy = sampling.temperature <= 0
    temperature = jnp.where(greedy, 1.0, sampling.temperature)
    return jnp.maximum(logits_BV.astype(jnp.float32) / temperature, _NEG)


def sample_scaled(z_BV, key, sampling: SamplingParams):
    """`sample_token` on logits already divided by the temperature (finite, float32)."""
    B, V = z_BV.shape
    b = _block_width(V)
    C = -(-V // b)
    greedy = sampling.temperature <= 0
    if C * b != V:
        z_BV = jnp.pad(z_BV, ((0, 0), (0, C * b - V)), constant_values=_NEG)
    # Passes over the vocabulary read z and use only ops that XLA:CPU's fused reduction kernels
    # take (sub, exp, mul, max, sum, sign): no B×V intermediate is materialised, only [B, V/b]
    # block statistics. The entropy pass shifts by the block max, not the row max, so that it
    # does not share `exp(z - m)` with the mass pass (a shared exp is materialised, then read
    # twice):  sum_i e_i (z_i - m) = sum_c [exp(bmax_c - m) A_c + (bmax_c - m) mass_c],
    # A_c = sum_{i in c} exp(z_i - bmax_c) (z_i - bmax_c).
    # The barriers stop XLA from rewriting a reduction of block statistics into a second full
    # pass over z (reduce(reduce(x)) -> reduce(x)), which would also share the exp.
    z_BCb = z_BV.reshape(B, C, b)
    bmax_BC = jax.lax.optimization_barrier(z_BCb.max(-1))
    m_B = bmax_BC.max(-1)
    mass_BC = jax.lax.optimization_barrier(jnp.exp(z_BCb - m_B[:, None, None]).sum(-1))
    s_B = mass_BC.sum(-1)
    log_s_B = jnp.log(s_B)
    d_BCb = z_BCb - bmax_BC[..., None]
    a_BC = (jnp.exp(d_BCb) * d_BCb).sum(-1)
    shift_BC = bmax_BC - m_B[:, None]
    entropy_B = log_s_B - (jnp.exp(shift_BC) * a_BC + shift_BC * mass_BC).sum(-1) / s_B
    best_B = _first_argmax(z_BCb, bmax_BC, m_B)

    filtered = (~greedy) & (
        ((sampling.top_k > 0) & (sampling.top_k < V)) | (sampling.top_p < 1) | (sampling.min_p > 0)
    )
    tau_B, kept_BC = jax.lax.cond(
        filtered,
        lambda: _filter_threshold(z_BCb, bmax_BC, m_B, s_B, sampling),
        lambda: (jnp.full((B,), -jnp.inf), mass_BC),
    )
    u_B2 = _uniforms(key, B)
    drawn_B = _draw(z_BCb, m_B, tau_B, kept_BC, u_B2, best_B)
    token_B = jnp.where(greedy, best_B, drawn_B)
    z_tok_B = jnp.take_along_axis(z_BV, token_B[:, None], axis=1)[:, 0]
    return token_B, z_tok_B - m_B - log_s_B, entropy_B


def _uniforms(key, B: int) -> jax.Array:
    """Two uniforms per row, [B, 2]: from one key, or from each row's own key."""
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.ndim == 0:
        return jax.random.uniform(key, (B, 2))
    if key.shape != (B,):
        raise ValueError(f"keys of shape {key.shape} for {B} rows: pass one key or one per row")
    return jax.vmap(lambda k: jax.random.uniform(k, (2,)))(key)


def _block_width(V: int) -> int:
    """Block width b of the [V/b, b] view: a power of two <= 128 dividing V with b*b <= V, so both
    levels stay short; vocabularies with no such divisor are padded to a multiple of 128."""
    for b in (128, 64, 32, 16, 8):
        if V % b == 0 and b * b <= V:
            return b
    return 128 if V >= 128 * 128 else 8


def _at_least(z, tau):
    """1.0 where z >= tau else 0.0, with arithmetic only (sign, add, min).

    Compare-and-select over the whole [B, V] block is what XLA:CPU's fast fused kernels cannot
    take; this form stays inside them. For finite z (and finite or -inf tau), z - tau is 0 only
    when z == tau. The draw re-checks the chosen block with a real comparison, so the support
    is exact even where this would round.
    """
    return jnp.minimum(jnp.sign(z - tau) + 1.0, 1.0)


def _first_argmax(z_BCb, bmax_BC, m_B):
    """Index of the first largest logit per row, from block maxima (no full-row argmax pass)."""
    b = z_BCb.shape[-1]
    block_B = jnp.argmax(bmax_BC == m_B[:, None], axis=-1)
    z_Bb = _gather_block(z_BCb, block_B)
    return (block_B * b + jnp.argmax(z_Bb, axis=-1)).astype(jnp.int32)


def _gather_block(z_BCb, block_B):
    return jnp.take_along_axis(z_BCb, block_B[:, None, None], axis=1)[:, 0]


def _draw(z_BCb, m_B, tau_B, kept_BC, u_B2, fallback_B):
    """Inverse-CDF draw among z >= tau: a block by its kept mass, then a token inside it."""
    C, b = z_BCb.shape[1:]
    cum_BC = jnp.cumsum(kept_BC, axis=-1)
    target_B = u_B2[:, 0] * cum_BC[:, -1]
    block_B = jnp.sum(cum_BC <= target_B[:, None], axis=-1)
    # Rounding can push the target past the last block holding mass: clamp to that block.
    last_B = jnp.max(jnp.where(kept_BC > 0, jnp.arange(C), -1), axis=-1)
    block_B = jnp.clip(jnp.minimum(block_B, last_B), 0, C - 1)
    z_Bb = _gather_block(z_BCb, block_B)
    e_Bb = jnp.where(z_Bb >= tau_B[:, None], jnp.exp(z_Bb - m_B[:, None]), 0.0)
    cum_Bb = jnp.cumsum(e_Bb, axis=-1)
    index_B = jnp.sum(cum_Bb <= (u_B2[:, 1] * cum_Bb[:, -1])[:, None], axis=-1)
    last_in_B = jnp.max(jnp.where(e_Bb > 0, jnp.arange(b), -1), axis=-1)
    index_B = jnp.minimum(index_B, last_in_B)
    # The row's top token is in every kept set: the answer if the kept mass underflowed to 0.
    ok_B = (cum_BC[:, -1] > 0) & (last_in_B >= 0)
    return jnp.where(ok_B, block_B * b + index_B, fallback_B).astype(jnp.int32)


def _filter_threshold(z_BCb, bmax_BC, m_B, s_B, sampling: SamplingParams):
    """Per-row logit threshold of top-k, top-p and min-p combined, and kept mass per block."""
    B, C, b = z_BCb.shape
    V = C * b
    k, top_p, min_p = sampling.top_k, sampling.top_p, sampling.min_p
    use_k = (k > 0) & (k < V)
    use_p = top_p < 1
    neg_inf = jnp.full((B,), -jnp.inf)

    def kept_mass_BC(tau_B):  # per block, the sum of exp(z - m) over z >= tau
        e_BCb = jnp.exp(z_BCb - m_B[:, None, None])
        return (e_BCb * _at_least(z_BCb, tau_B[:, None, None])).sum(-1)

    def mass(tau_B):
        return kept_mass_BC(tau_B).sum(-1)

    def count(tau_B):
        return _at_least(z_BCb, tau_B[:, None, None]).sum((1, 2))

    def top_k_and_p():
        vals_BX = _largest_values(z_BCb, bmax_BC, _CANDIDATES)
        X = vals_BX.shape[1]
        # top-k: the k-th largest logit, from the candidates when k <= X, else by bisection.
        tau_k = jnp.where(use_k, vals_BX[:, jnp.clip(k - 1, 0, X - 1)], -jnp.inf)
        tau_k = jax.lax.cond(
            use_k & (k > X),
            lambda: _largest_threshold(count, k.astype(jnp.float32) * jnp.ones((B,))),
            lambda: tau_k,
        )
        s_k = jnp.where(use_k, mass(tau_k), s_B)
        # top-p over the top-k-renormalised distribution: the value at which the descending
        # cumulative mass first reaches p. Exact from the candidates if they hold that much.
        p_BX = jnp.where(vals_BX >= tau_k[:, None], jnp.exp(vals_BX - m_B[:, None]), 0.0)
        cum_BX = jnp.cumsum(p_BX, axis=-1) / s_k[:, None]
        j_B = jnp.sum(cum_BX < top_p, axis=-1)
        found_B = j_B < X
        at_j_B = jnp.take_along_axis(vals_BX, jnp.minimum(j_B, X - 1)[:, None], axis=1)[:, 0]
        tau_p = jnp.where(use_p & found_B, at_j_B, -jnp.inf)
        need_B = use_p & ~found_B
        tau_p = jax.lax.cond(
            jnp.any(need_B),
            lambda: jnp.where(
                need_B,
                _largest_threshold(lambda t: mass(jnp.maximum(t, tau_k)), top_p * s_k),
                tau_p,
            ),
            lambda: tau_p,
        )
        return jnp.maximum(tau_k, tau_p)

    tau_kp = jax.lax.cond(use_k | use_p, top_k_and_p, lambda: neg_inf)
    tau_min = jnp.where(min_p > 0, m_B + jnp.log(jnp.maximum(min_p, 1e-38)), -jnp.inf)
    tau_B = jnp.maximum(tau_kp, tau_min)
    return tau_B, kept_mass_BC(tau_B)


def _largest_values(z_BCb, bmax_BC, cap: int):
    """The `cap` largest logits of each row, sorted descending, without touching most blocks.

    Exact: take the `cap` blocks with the largest maxima (ties either way). A value among the
    row's `cap` largest that sat in an unselected block would be <= each selected block's max,
    i.e. there would already be `cap` values >= it among the candidates, so the `cap` largest
    candidate values are the row's `cap` largest values (as a multiset of values).
    """
    B, C, b = z_BCb.shape
    W = min(cap, C)
    _, blocks_BW = jax.lax.top_k(bmax_BC, W)
    pool_BX = jnp.take_along_axis(z_BCb, blocks_BW[:, :, None], axis=1).reshape(B, W * b)
    return jax.lax.top_k(pool_BX, min(cap, W * b))[0]


def _largest_threshold(fn, target_B):
    """Per row, the largest float t with fn(t) >= target, for fn non-increasing in t.

    Greedy over the 32 bits of an order-preserving integer key of float32 (most significant
    first). The answer is always a value present in the row, since fn only changes there.
    Keys below 2**23 (that of the lowest finite float) decode to -inf or NaN; NaN trials fail
    the test. They are reached only if even fn(lowest float) < target, which rounding can do
    for a top-p target near the total mass: the answer is then the lowest float (keep all).
    """

    def to_float(key_B):
        bits = jnp.where(key_B >= jnp.uint32(1 << 31), key_B ^ jnp.uint32(1 << 31), ~key_B)
        return jax.lax.bitcast_convert_type(bits, jnp.float32)

    def body(i, key_B):
        trial_B = key_B | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(fn(to_float(trial_B)) >= target_B, trial_B, key_B)

    key_B = jax.lax.fori_loop(0, _BISECT_STEPS, body, jnp.zeros(target_B.shape, jnp.uint32))
    return jnp.where(key_B < jnp.uint32(1 << 23), jnp.finfo(jnp.float32).min, to_float(key_B))
