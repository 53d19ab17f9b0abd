"""Benchmark sub-commands at trivially small sizes: they run, print their ratio, and compare
like with like.

`forward` and `sample` have no vocabulary flag (they always build Qwen2.5's 151936-token
embedding, then export it and load it into transformers), so they have no trivially small run
and are not smoke-tested here.
"""

import argparse

import numpy as np
import pytest

from ttrl_jax import bench, grpo
from ttrl_jax import model as model_lib

TINY = model_lib.ModelConfig.from_hf(
    {**bench.QWEN25_05B_HF, "num_hidden_layers": 1, "vocab_size": 64}
)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    for add_command in bench.COMMANDS:
        add_command(sub)
    return parser.parse_args(argv)


def test_rollout_pads_like_a_real_batch_and_every_group_has_signal():
    P, N, T, R = 3, 5, 6, 7
    batch = bench.make_rollout(TINY, P, N, T, R, seed=1)
    prompt_mask = np.asarray(batch.prompt_mask_PT)
    response_mask = np.asarray(batch.response_mask_PNR)
    # Left-padded prompts (padding first), right-padded responses (padding last).
    assert (np.diff(prompt_mask.astype(int), axis=1) >= 0).all() and prompt_mask[:, -1].all()
    assert (np.diff(response_mask.astype(int), axis=2) <= 0).all() and response_mask[..., 0].all()
    majority_P, _ = grpo.majority_vote(batch.answer_id_PN)
    advantage_PN = grpo.group_advantages(grpo.vote_reward(batch.answer_id_PN, majority_P))
    assert (np.abs(np.asarray(advantage_PN)).max(axis=1) > 0.5).all()


@pytest.mark.parametrize("with_ref", [True, False])
def test_train_flops_against_the_forward_count(with_ref):
    rows, T, R = 6, 10, 4
    f = bench.forward_flops(TINY, rows, T + R)
    # A forward that unembeds only the response positions.
    forward = f["dense"] + f["attention"] + 2 * TINY.embed_dim * TINY.vocab_size * rows * R
    flops = bench.train_flops(TINY, rows, T, R, with_ref=with_ref)
    assert flops["policy forward + backward"] == 3 * forward
    assert flops["old log-prob forward"] == forward
    assert ("reference forward" in flops) == with_ref
    assert flops["total"] == (5 if with_ref else 4) * forward


@pytest.mark.slow
def test_train_bench_tiny(capsys, monkeypatch):
    # The machine figures have their own cost (seconds of 2048² matmuls); not what is tested here.
    monkeypatch.setattr(bench, "measure_matmul_peak", lambda **_: 1e9)
    monkeypatch.setattr(bench, "measure_memory_bandwidth", lambda **_: 1e9)
    args = parse(
        ["train", "--layers", "1", "--vocab", "64", "--prompts", "2", "--samples", "2",
         "--prompt-len", "4", "--response-len", "4", "--repeats", "1"]
    )  # fmt: skip
    results = args.run(args)
    out = capsys.readouterr().out
    assert "tokens/s ratio ttrl_jax / transformers: " in out
    assert results["ratio"] > 0
    # Both sides compute the same log-probs, loss and gradient, and the whole first step agrees.
    assert results["logp_diff"] < 1e-4
    assert results["loss_diff"] < 1e-5
    assert results["grad_norm_rel_diff"] < 1e-4
    assert results["step_loss_diff"] < 1e-5
