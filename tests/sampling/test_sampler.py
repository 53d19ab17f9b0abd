"""sampling/sampler.py, with rounds.py: cached decoding equals full-forward decoding, stop
masking, early exit, no recompiles across sampling values, per-response streams, rounds equal one
call, sharded equals unsharded. The decoding tests share two compiled programs (unsharded and
sharded) whose stop ids, chosen from the full-forward reference, stop some rows and not others."""

import dataclasses

import chex
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from ttrl_jax import sharding
from ttrl_jax.model import config as model_config
from ttrl_jax.model import decoder as model
from ttrl_jax.model.config import ModelConfig
from ttrl_jax.run import rollout
from ttrl_jax.sampling import rounds, sampler, token_draw
from ttrl_jax.toy import tokenizer as toy_tokenizer

P, T, N, R = 4, 8, 2, 7
PAD = 0
LENGTHS = (8, 5, 1, 3)  # left-padded prompts of different lengths, one of a single token


# q/k/v bias, Qwen3 q/k norm, tied embeddings, GQA (4 query heads over 2 kv heads).
QWEN3_CFG = ModelConfig.tiny("qwen3", qkv_bias=True, tie_embeddings=True)


# The sharded test's model: untied head, Llama-3 rope scaling bending the frequencies at these
# positions, K=2 kv heads that do not divide a model axis of 4 (replicated).
LLAMA_CFG = ModelConfig.tiny(
    "llama",
    qkv_bias=True,
    rope_scaling=model_config.RopeScaling(8.0, 1.0, 4.0, original_max_position_embeddings=4),
)


_forward = jax.jit(model.forward, static_argnums=0)


def _params(cfg, seed):
    """Random params with spread-out logits, biases and norms included (drawn with numpy: no
    init to compile)."""
    shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        noise = rng.standard_normal(x.shape).astype(np.float32)
        is_norm = jax.tree_util.keystr(path).endswith("['scale']")
        return jnp.asarray(1 + 0.1 * noise if is_norm else 0.1 * noise)

    return jax.tree.map_with_path(draw, shapes)


def _prompts(vocab, seed):
    rng = np.random.default_rng(seed)
    tokens = np.zeros((len(LENGTHS), T), np.int32)
    mask = np.zeros((len(LENGTHS), T), bool)
    for i, n in enumerate(LENGTHS):
        tokens[i, T - n :] = rng.integers(1, vocab, n)
        mask[i, T - n :] = True
    return tokens, mask


def _full_forward(cfg, params, prompt_PT, prompt_mask_PT, response_PR, response_mask_PR):
    """Logits [P*N, R, V] predicting each response slot, from one uncached forward over the
    prompts (each repeated N times) followed by the responses ([P*N, R] or [P, R])."""
    rows = lambda x: x if len(x) == P * N else np.repeat(x, N, 0)
    seq = np.concatenate([rows(prompt_PT), rows(response_PR)], 1)
    mask = np.concatenate([rows(prompt_mask_PT), rows(response_mask_PR)], 1)
    logits, _ = _forward(cfg, params, seq, model.left_pad_positions(mask), mask)
    return logits[:, T - 1 : T + response_PR.shape[1] - 1]


def _full_forward_greedy(cfg, params, tokens_PT, mask_PT, length=R):
    """Greedy decoding without a cache: the whole sequence is re-run at every step."""
    response = np.zeros((P, length), np.int32)
    tokens, logps, entropies = [], [], []
    for t in range(length):
        # Causal attention: the not-yet-generated positions cannot affect slot t.
        live = np.broadcast_to(np.arange(length) < t, (P, length))
        logits_BRV = _full_forward(cfg, params, tokens_PT, mask_PT, response, live)
        logp_PV = jax.nn.log_softmax(logits_BRV[::N, t], axis=-1)
        tok = np.asarray(jnp.argmax(logp_PV, axis=-1))
        tokens.append(tok)
        logps.append(np.asarray(logp_PV)[np.arange(P), tok])
        entropies.append(np.asarray(-(jnp.exp(logp_PV) * logp_PV).sum(-1)))
        response[:, t] = tok
    return np.stack(tokens, 1), np.stack(logps, 1), np.stack(entropies, 1)


def _after_stop(tokens_BR, stop_ids):
    """Mask, tokens (pad after the first stop), lengths and finish reasons, computed directly."""
    mask = np.ones(tokens_BR.shape, bool)
    finish = np.full(tokens_BR.shape[0], sampler.FINISH_LENGTH)
    for row, toks in enumerate(tokens_BR):
        hits = np.flatnonzero(np.isin(toks, stop_ids))
        if hits.size:
            mask[row, hits[0] + 1 :] = False
            finish[row] = sampler.FINISH_STOP
    return mask, np.where(mask, tokens_BR, PAD), mask.sum(1), finish


@dataclasses.dataclass
class Case:
    """One model with its prompts, full-forward greedy reference and stop ids."""

    cfg: ModelConfig
    params: dict
    tokens: np.ndarray
    mask: np.ndarray
    ref_tokens: np.ndarray  # [P, R] greedy continuations, no stop tokens
    ref_logp: np.ndarray
    ref_entropy: np.ndarray
    stop_ids: tuple[int, ...]

    def run(
        self, tokens=None, key=0, mesh=None, params=None, length=R, stop_ids=None,
        prompt_chunk=None, kv_block=sampler.KV_BLOCK, **sampling_kw,
    ):  # fmt: skip
        return sampler.sample(
            self.params if params is None else params, self.cfg,
            self.tokens if tokens is None else tokens, self.mask, jax.random.key(key),
            token_draw.SamplingParams.make(**sampling_kw), n_samples=N, max_new_tokens=length,
            stop_ids=self.stop_ids if stop_ids is None else stop_ids, pad_id=PAD, mesh=mesh,
            prompt_chunk=prompt_chunk, kv_block=kv_block,
        )  # fmt: skip


def _case(cfg, seed):
    params = _params(cfg, seed)
    tokens, mask = _prompts(cfg.vocab_size, seed)
    ref = _full_forward_greedy(cfg, params, tokens, mask)
    # Prompt 0 stops at its third token, prompt 1 at its fifth (or earlier if that token came
    # before); the others run to max_new_tokens unless they happen to produce either id.
    stop_ids = tuple(sorted({int(ref[0][0, 2]), int(ref[0][1, 4])}))
    return Case(cfg, params, tokens, mask, *ref, stop_ids)


@pytest.fixture(scope="module")
def qwen3():
    return _case(QWEN3_CFG, seed=1)


@pytest.fixture(scope="module")
def llama():
    return _case(LLAMA_CFG, seed=2)


def _check_against_reference(case: Case, out: sampler.Rollout):
    chex.assert_shape([out.tokens_PNR, out.mask_PNR, out.logp_PNR, out.entropy_PNR], (P, N, R))
    chex.assert_shape([out.length_PN, out.finish_PN], (P, N))
    assert len({tuple(r) for r in case.ref_tokens}) == P  # prompts continue differently
    mask, tokens, length, finish = _after_stop(case.ref_tokens, case.stop_ids)
    assert set(finish) == {sampler.FINISH_STOP, sampler.FINISH_LENGTH}  # both kinds covered
    rep = lambda x: np.repeat(x[:, None], N, 1)  # greedy: the N samples are equal
    np.testing.assert_array_equal(out.tokens_PNR, rep(tokens))
    np.testing.assert_array_equal(out.mask_PNR, rep(mask))
    np.testing.assert_array_equal(out.length_PN, rep(length))
    np.testing.assert_array_equal(out.finish_PN, rep(finish))
    np.testing.assert_allclose(out.logp_PNR, rep(np.where(mask, case.ref_logp, 0)), atol=1e-5)
    np.testing.assert_allclose(out.entropy_PNR, rep(np.where(mask, case.ref_entropy, 0)), atol=1e-5)
    assert int(out.num_steps) == R - 1  # some rows never stop: the loop ran to the end


def test_greedy_cached_equals_full_forward(qwen3):
    _check_against_reference(qwen3, qwen3.run(temperature=0.0))


def test_early_exit_when_every_row_stops(qwen3):
    # Every row gets prompt 0, which emits a stop token by step 2: the loop exits right there.
    tokens = np.repeat(qwen3.tokens[:1], P, 0)
    mask = np.repeat(qwen3.mask[:1], P, 0)
    case = dataclasses.replace(qwen3, tokens=tokens, mask=mask)
    out = case.run(temperature=0.0)
    _, _, (length,), _ = _after_stop(qwen3.ref_tokens[:1], qwen3.stop_ids)
    assert int(out.num_steps) == length - 1 < R - 1
    np.testing.assert_array_equal(out.length_PN, length)
    np.testing.assert_array_equal(out.finish_PN, sampler.FINISH_STOP)
    np.testing.assert_array_equal(out.tokens_PNR[..., length:], PAD)
    assert not np.asarray(out.mask_PNR)[..., length:].any()


def test_sampled_rows_masks_and_log_probs(qwen3):
    # Sampled rows (distinct within a group, so rows cannot mix unnoticed): each mask is a
    # prefix ending at the first stop token or covering all R slots, and the log-probs and
    # entropies are those of softmax(logits / temperature) under a full forward.
    temperature = 0.8
    out = qwen3.run(key=11, temperature=temperature)
    toks_BR = np.asarray(out.tokens_PNR).reshape(P * N, R)
    mask_BR = np.asarray(out.mask_PNR).reshape(P * N, R)
    finish_B = np.asarray(out.finish_PN).reshape(-1)
    length_B = np.asarray(out.length_PN).reshape(-1)
    assert len({tuple(r) for r in toks_BR}) == P * N
    for toks, m, finish, length in zip(toks_BR, mask_BR, finish_B, length_B):
        assert m.sum() == length and m[:length].all()
        assert (toks[length:] == PAD).all()
        is_stop = np.isin(toks[:length], qwen3.stop_ids)
        assert not is_stop[:-1].any()
        assert is_stop[-1] == (finish == sampler.FINISH_STOP)
        assert finish == sampler.FINISH_STOP or length == R
    ran = R - 1 if (finish_B == sampler.FINISH_LENGTH).any() else length_B.max() - 1
    assert int(out.num_steps) == ran

    logits_BRV = _full_forward(qwen3.cfg, qwen3.params, qwen3.tokens, qwen3.mask, toks_BR, mask_BR)
    logp_BRV = jax.nn.log_softmax(logits_BRV / temperature, axis=-1)
    ref_logp = np.take_along_axis(np.asarray(logp_BRV), toks_BR[..., None], -1)[..., 0]
    ref_entropy = np.asarray(-(jnp.exp(logp_BRV) * logp_BRV).sum(-1))
    logp_BR = np.asarray(out.logp_PNR).reshape(P * N, R)
    entropy_BR = np.asarray(out.entropy_PNR).reshape(P * N, R)
    np.testing.assert_allclose(logp_BR, np.where(mask_BR, ref_logp, 0), atol=1e-5)
    np.testing.assert_allclose(entropy_BR, np.where(mask_BR, ref_entropy, 0), atol=1e-5)


def test_changing_sampling_values_does_not_recompile(qwen3):
    fn = sampler.compiled_sampler(qwen3.cfg, N, R, qwen3.stop_ids, PAD)
    qwen3.run(temperature=0.0)
    before = fn._cache_size()
    for i, kw in enumerate(
        [
            dict(temperature=1.0),
            dict(temperature=0.6, top_p=0.9),
            dict(temperature=1.3, top_k=5, min_p=0.05),
            dict(temperature=0.0, top_k=3),
        ]
    ):
        assert qwen3.run(key=i, **kw).tokens_PNR.shape == (P, N, R)
    assert fn._cache_size() == before == 1


def test_keys_reproduce_and_rows_draw_separately(qwen3):
    a, b = qwen3.run(key=7, temperature=1.0), qwen3.run(key=7, temperature=1.0)
    c = qwen3.run(key=8, temperature=1.0)
    np.testing.assert_array_equal(a.tokens_PNR, b.tokens_PNR)
    assert (np.asarray(a.tokens_PNR) != np.asarray(c.tokens_PNR)).any()
    assert (np.asarray(a.tokens_PNR)[:, 0] != np.asarray(a.tokens_PNR)[:, 1]).any()


def _sample_rows(case, tokens, mask, n, **kw):
    return sampler.sample(
        case.params, case.cfg, tokens, mask, jax.random.key(3),
        token_draw.SamplingParams.make(temperature=1.0), n_samples=n, max_new_tokens=R,
        stop_ids=case.stop_ids, pad_id=PAD, **kw,
    )  # fmt: skip


_ROW_FIELDS = ("tokens_PNR", "mask_PNR", "length_PN", "finish_PN", "logp_PNR", "entropy_PNR")


def _assert_same_rows(a, b):
    """Rows (lists of _ROW_FIELDS arrays) equal: ids exactly, log-probs and entropies closely."""
    for name, x, y in zip(_ROW_FIELDS, a, b):
        if name.startswith(("logp", "entropy")):
            np.testing.assert_allclose(x, y, atol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)


def test_a_response_depends_only_on_its_prompt_and_sample_index(qwen3):
    # One call: 4 prompts x 8 samples. Then each prompt alone, its samples 0..3 in one call and
    # 4..7 (in a shuffled order) in another, and all prompts in reverse order: each response
    # equals that of the same (prompt index, sample index) in the first call.
    whole = jax.tree.map(np.asarray, _sample_rows(qwen3, qwen3.tokens, qwen3.mask, 8))
    assert len({tuple(r) for r in whole.tokens_PNR.reshape(-1, R)}) > 16  # rows draw separately
    take = lambda r, p, n: [np.asarray(getattr(r, f))[p][:, n] for f in _ROW_FIELDS]
    for p in range(P):
        for n in ([0, 1, 2, 3], [6, 4, 7, 5]):
            part = _sample_rows(
                qwen3, qwen3.tokens[p : p + 1], qwen3.mask[p : p + 1], 4,
                prompt_index_P=np.array([p]), sample_index_PN=np.array([n]),
            )  # fmt: skip
            _assert_same_rows(take(part, [0], range(4)), take(whole, [p], n))
    flipped = _sample_rows(
        qwen3, qwen3.tokens[::-1], qwen3.mask[::-1], 8, prompt_index_P=np.arange(P)[::-1]
    )
    _assert_same_rows(
        take(flipped, slice(None, None, -1), range(8)), take(whole, slice(None), range(8))
    )


def test_stopped_rows_leave_the_loop_without_changing_a_response(qwen3):
    # 16 sampled rows per prompt and 32 stop ids of 128: rows stop at scattered steps, so the
    # loop halves its rows per prompt on the way (16 -> 8 -> 4 -> 2). Every response is the
    # one of the loop that decodes all rows to the end; only the rows computed drop.
    n, length = 16, 16
    stop_ids = tuple(range(96, 128))

    def run(halvings, **kw):
        out = sampler.sample(
            qwen3.params, qwen3.cfg, qwen3.tokens, qwen3.mask, jax.random.key(5),
            token_draw.SamplingParams.make(temperature=1.0), n_samples=n, max_new_tokens=length,
            stop_ids=stop_ids, pad_id=PAD, halvings=halvings, **kw,
        )  # fmt: skip
        return jax.tree.map(np.asarray, out)

    every_row = run(0)
    assert int(every_row.row_steps) == P * n * int(every_row.num_steps)
    assert len(np.unique(every_row.length_PN)) > 4
    fields = lambda r: [getattr(r, f) for f in _ROW_FIELDS]
    running = int((every_row.mask_PNR[..., 1:]).sum())  # row steps that feed a running row
    chunked_every_row = run(0, prompt_chunk=2)
    computed = {}
    for halvings, kw, full in ((1, {}, every_row), (3, {}, every_row),
                               (3, dict(prompt_chunk=2), chunked_every_row)):  # fmt: skip
        out = run(halvings, **kw)
        _assert_same_rows(fields(out), fields(every_row))
        assert running <= int(out.row_steps) < int(full.row_steps)
        computed[halvings, bool(kw)] = int(out.row_steps)
    assert computed[3, False] < computed[1, False]


def test_first_tokens_follow_the_model_across_streams(qwen3, filtered_probs, check_distribution):
    # 2 x 1000 first tokens of one prompt, under two prompt indices: each prompt index's draws
    # follow softmax(logits) of the full forward, and the two streams differ.
    n = 1000
    tokens, mask = np.repeat(qwen3.tokens[1:2], 2, 0), np.repeat(qwen3.mask[1:2], 2, 0)
    out = sampler.sample(
        qwen3.params, qwen3.cfg, tokens, mask, jax.random.key(4),
        token_draw.SamplingParams.make(temperature=1.0), n_samples=n, max_new_tokens=1,
        stop_ids=(), pad_id=PAD,
    )  # fmt: skip
    first_PN = np.asarray(out.tokens_PNR)[..., 0]
    logits, _ = _forward(
        qwen3.cfg, qwen3.params, tokens[:1], model.left_pad_positions(mask[:1]), mask[:1]
    )
    expected = filtered_probs(np.asarray(logits[0, -1]))
    for row in first_PN:
        check_distribution(row, expected)
    assert (first_PN[0] != first_PN[1]).mean() > 0.5


def _on_2x4_mesh(case: Case):
    """A 2x4 mesh, the case's params in the sample layout and its prompts split over data."""
    mesh = sharding.make_mesh("2x4", jax.devices()[:8])
    params = jax.device_put(
        case.params, model.param_shardings(case.cfg, mesh, sharding.SAMPLE_RULES)
    )
    rows = sharding.batch_sharding(mesh, 2)
    placed = dataclasses.replace(
        case, tokens=jax.device_put(case.tokens, rows), mask=jax.device_put(case.mask, rows)
    )
    return mesh, params, placed


def test_sharded_greedy_equals_full_forward(llama):
    # 2x4 mesh: rows over data; query heads, MLP and vocabulary over model; K=2 kv heads
    # replicated. This also covers the unfused (tensor-parallel) weights of the decode step,
    # an untied head and rope scaling; the unsharded run equals the same reference above.
    mesh, params, case = _on_2x4_mesh(llama)
    out = case.run(mesh=mesh, params=params, temperature=0.0)
    assert out.tokens_PNR.sharding.is_equivalent_to(
        NamedSharding(mesh, PartitionSpec("data", None, None)), 3
    )
    _check_against_reference(llama, out)


def _round(case, prefilled, groups, samples, live=None, mesh=None, params=None, **kw):
    return rounds.sample_groups(
        case.params if params is None else params, case.cfg, prefilled, jax.random.key(3),
        token_draw.SamplingParams.make(temperature=1.0), np.asarray(groups), np.asarray(samples),
        None if live is None else np.asarray(live, bool), max_new_tokens=R,
        stop_ids=case.stop_ids, pad_id=PAD, mesh=mesh, **kw,
    )  # fmt: skip


def _assert_round_rows(out, groups, samples, live, whole):
    """Live rows equal the one-call rows of their (prompt, sample index); idle rows are empty."""
    got, want = _rows(out), _rows(whole)
    live = np.asarray(live, bool)
    g, j = np.nonzero(live)
    p, n = np.asarray(groups)[g], np.asarray(samples)[g, j]
    _assert_same_rows([x[g, j] for x in got], [x[p, n] for x in want])
    assert not np.asarray(out.mask_PNR)[~live].any()
    assert (np.asarray(out.length_PN)[~live] == 0).all()


def test_rounds_give_the_responses_of_one_call(qwen3):
    # One prefill, then rounds of any shape: a first round of samples 0..2 of every prompt, a
    # second where prompt 1 gets two groups, prompt 3 one with an idle row, one group is idle.
    whole = _sample_rows(qwen3, qwen3.tokens, qwen3.mask, 8)
    prefilled = rounds.prefill(qwen3.params, qwen3.cfg, qwen3.tokens, qwen3.mask)
    first = (np.arange(P), np.tile(np.arange(3), (P, 1)), np.ones((P, 3)))
    _assert_round_rows(_round(qwen3, prefilled, *first), *first, whole)
    second = (
        [1, 1, 3, 0],
        [[3, 4, 5], [6, 7, 0], [3, 4, 5], [0, 1, 2]],
        [[1, 1, 1], [1, 1, 0], [1, 1, 0], [0, 0, 0]],
    )
    for chunk in (None, 2):
        out = _round(qwen3, prefilled, *second, group_chunk=chunk)
        _assert_round_rows(out, *second, whole)
    # The idle rows do not hold the loop up: a round of prompt 0's rows alone (it stops at its
    # third token) ends as soon as they do.
    only_0 = ([0, 2], [[0, 1, 2], [0, 1, 2]], [[1, 1, 1], [0, 0, 0]])
    greedy = rounds.sample_groups(
        qwen3.params, qwen3.cfg, prefilled, jax.random.key(0), token_draw.SamplingParams.make(0.0),
        *(np.asarray(x) for x in only_0[:2]), np.asarray(only_0[2], bool), max_new_tokens=R,
        stop_ids=qwen3.stop_ids, pad_id=PAD,
    )  # fmt: skip
    assert int(greedy.num_steps) < R - 1


def test_sharded_rounds_equal_one_unsharded_call(llama):
    # 2x4 mesh: prompts and groups split over data in two blocks; each group draws for a
    # prompt of its own block (prompt 1 twice in block 0, one idle row in block 1).
    mesh, params, case = _on_2x4_mesh(llama)
    whole = _sample_rows(llama, llama.tokens, llama.mask, 8)
    prefilled = rounds.prefill(params, case.cfg, case.tokens, case.mask, mesh=mesh)
    plan = ([1, 1, 3, 2], [[0, 1], [2, 3], [5, 6], [7, 0]], [[1, 1], [1, 1], [1, 1], [1, 0]])
    out = _round(llama, prefilled, *plan, mesh=mesh, params=params)
    assert out.tokens_PNR.sharding.is_equivalent_to(
        NamedSharding(mesh, PartitionSpec("data", None, None)), 3
    )
    _assert_round_rows(out, *plan, whole)
    with pytest.raises(ValueError, match="one of the 4 prompts of its own data shard"):
        _round(llama, prefilled, [2, 1, 3, 2], *plan[1:], mesh=mesh, params=params)


def _rows(out: sampler.Rollout):
    return [np.asarray(getattr(out, f)) for f in _ROW_FIELDS]


def test_blocked_response_attention_equals_full_forward(qwen3):
    # 30 response slots read in blocks of 4: a step attends to 1 to 8 blocks, the last one
    # partial (29 cache slots). Greedy equals the uncached forward; sampled rows equal those of
    # the one-block attention.
    length = 30
    ref = _full_forward_greedy(qwen3.cfg, qwen3.params, qwen3.tokens, qwen3.mask, length)
    out = qwen3.run(temperature=0.0, length=length, stop_ids=(), kv_block=4)
    rep = lambda x: np.repeat(x[:, None], N, 1)
    np.testing.assert_array_equal(out.tokens_PNR, rep(ref[0]))
    np.testing.assert_allclose(out.logp_PNR, rep(ref[1]), atol=1e-5)
    np.testing.assert_allclose(out.entropy_PNR, rep(ref[2]), atol=1e-5)
    assert int(out.num_steps) == length - 1
    blocked = qwen3.run(key=9, temperature=1.0, length=length, kv_block=4)
    whole = qwen3.run(key=9, temperature=1.0, length=length, kv_block=length)
    _assert_same_rows(_rows(blocked), _rows(whole))
    assert (np.asarray(whole.length_PN) > 8).any()  # some rows reach the third block


def test_prompt_chunks_give_the_same_rollouts(qwen3):
    whole = qwen3.run(key=5, temperature=1.0)
    for chunk in (1, 2):
        out = qwen3.run(key=5, temperature=1.0, prompt_chunk=chunk)
        _assert_same_rows(_rows(out), _rows(whole))
        assert int(out.num_steps) >= int(whole.num_steps)  # summed over the passes
    with pytest.raises(ValueError, match="prompt_chunk=3 must divide the 4 prompts"):
        qwen3.run(prompt_chunk=3)
    # The run's path: a Generator with sample.prompt_chunk, from token-id lists to texts.
    generator = rollout.Generator(
        qwen3.cfg, toy_tokenizer.build_tokenizer(), qwen3.stop_ids, PAD, (T,), prompt_chunk=2
    )
    prompt_ids = [list(t[m]) for t, m in zip(qwen3.tokens, qwen3.mask)]
    sampling = token_draw.SamplingParams.make(temperature=1.0)
    gen = generator(qwen3.params, prompt_ids, jax.random.key(5), sampling, N, R)
    _assert_same_rows(_rows(gen.rollout), _rows(whole))


def test_sharded_chunked_blocked_sampling_equals_unsharded(llama):
    # 2x4 mesh, two passes of 2 prompts (one per data shard each), response attention in blocks
    # of 4 of the 6 cache slots: the same rows as one unsharded pass with one block.
    mesh, params, case = _on_2x4_mesh(llama)
    out = case.run(key=2, mesh=mesh, params=params, temperature=1.0, prompt_chunk=2, kv_block=4)
    assert out.tokens_PNR.sharding.is_equivalent_to(
        NamedSharding(mesh, PartitionSpec("data", None, None)), 3
    )
    _assert_same_rows(_rows(out), _rows(llama.run(key=2, temperature=1.0)))
    with pytest.raises(ValueError, match="multiple of the mesh's data axis"):
        case.run(mesh=mesh, params=params, prompt_chunk=1)


def test_sample_rejects_index_arrays_of_the_wrong_shape(qwen3):
    for kw, msg in [
        (dict(prompt_index_P=np.arange(P + 1)), "prompt_index_P has shape"),
        (dict(sample_index_PN=np.zeros((P, N + 1), int)), "sample_index_PN has shape"),
    ]:
        with pytest.raises(ValueError, match=msg):
            _sample_rows(qwen3, qwen3.tokens, qwen3.mask, N, **kw)


def test_sampler_compiles_for_tpu_v5e_2x2(v5e_devices):
    # The tiny model in bfloat16 with 128-wide heads (TPU tiles), sharded (rows over data, heads
    # over model), the prefill by the Pallas kernel, responses longer than an attention block; in
    # one pass and in two passes of 2 prompts, whose decode loop holds half the caches; and in
    # rounds from one prefill (an adaptive vote).
    mesh = sharding.make_mesh("2x2", v5e_devices)
    cfg = LLAMA_CFG.replace(dtype="bfloat16", head_dim=128)
    shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    to_mesh = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    params = jax.tree.map(to_mesh, shapes, model.param_shardings(cfg, mesh, sharding.SAMPLE_RULES))
    rows, rep = sharding.batch_sharding(mesh, 2), sharding.replicated(mesh)
    args = (
        params,
        jax.ShapeDtypeStruct((P, T), jnp.int32, sharding=rows),
        jax.ShapeDtypeStruct((P, T), jnp.bool_, sharding=rows),
        jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep),
        jax.tree.map(lambda x: to_mesh(x, rep), jax.eval_shape(token_draw.SamplingParams.make)),
    )
    n, length = 16, 1024
    peak = {}
    for chunk in (0, 2):
        fn = sampler.compiled_sampler(cfg, n, length, (1,), PAD, mesh, chunk, kv_block=64)
        with jax.default_matmul_precision("default"):  # the suite's "highest" is for CPU parity
            compiled = fn.lower(*args).compile()
        assert "tpu_custom_call" in compiled.as_text()
        # Peak, not temporaries: XLA:TPU keeps buffers this small in on-chip memory.
        peak[chunk] = compiled.memory_analysis().peak_memory_in_bytes
    # Per device: P/2 prompts x n rows, 2 layers, 1 kv head, keys and values of R - 1 slots.
    caches = P // 2 * n * 2 * 1 * (length - 1) * 128 * 2 * 2
    assert peak[0] - peak[2] > 0.9 * caches / 2

    # The same in rounds: the prefill once (the Pallas kernel), then a first round of n/2 rows
    # per prompt and a later one of P/2 groups x n/4 rows, decoding from the stored prefill.
    with jax.default_matmul_precision("default"):
        prefill = rounds.compiled_prefill(cfg, P, T, mesh).lower(*args[:3], args[1]).compile()
    assert "tpu_custom_call" in prefill.as_text()
    for groups, rows in ((P, n // 2), (P // 2, n // 4)):
        stored, *plan = rounds.abstract_round_inputs(cfg, mesh, P, T, groups, rows)
        fn = rounds.compiled_groups(cfg, rows, length, (1,), PAD, mesh, kv_block=64)
        with jax.default_matmul_precision("default"):
            compiled = fn.lower(params, stored, *args[3:], *plan).compile()
        # Its response caches, and no more: a round of half the rows saves half the caches.
        saved = caches * (1 - groups * rows / (P * n))
        assert peak[0] - compiled.memory_analysis().peak_memory_in_bytes > 0.9 * saved
