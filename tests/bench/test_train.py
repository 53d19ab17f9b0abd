"""bench/train.py at trivially small sizes: the synthetic rollout, FLOP counts, the command end
to end (it runs, prints its ratio and breakdown, and compares like with like).

`forward` and `sample` export and load their model into transformers like `train` does; they
are run by hand at real shapes (their figures are the benchmark), not here.
"""

import argparse

import numpy as np
import pytest

from ttrl_jax.bench import commands, forward, machine, models, profile
from ttrl_jax.bench import train as bench_train
from ttrl_jax.model import config as model_config
from ttrl_jax.rl import advantages, rewards, vote

TINY = model_config.preset("HuggingFaceTB/SmolLM2-135M", num_layers=1, vocab_size=64)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    for add_command in commands.COMMANDS:
        add_command(sub)
    return parser.parse_args(argv)


def test_rollout_pads_like_a_real_batch_and_every_group_has_signal():
    P, N, T, R = 3, 5, 6, 7
    batch = bench_train.make_rollout(TINY, P, N, T, R, seed=1)
    prompt_mask = np.asarray(batch.prompt_mask_PT)
    response_mask = np.asarray(batch.response_mask_PNR)
    # Left-padded prompts (padding first), right-padded responses (padding last).
    assert (np.diff(prompt_mask.astype(int), axis=1) >= 0).all() and prompt_mask[:, -1].all()
    assert (np.diff(response_mask.astype(int), axis=2) <= 0).all() and response_mask[..., 0].all()
    majority_P, _ = vote.majority_vote(batch.answer_id_PN)
    advantage_PN = advantages.group_advantages(rewards.vote_reward(batch.answer_id_PN, majority_P))
    assert (np.abs(np.asarray(advantage_PN)).max(axis=1) > 0.5).all()


@pytest.mark.parametrize("with_ref,with_old", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("shared", [False, True])
def test_train_flops_against_the_forward_count(with_ref, with_old, shared):
    P, M, T, R = 2, 3, 10, 4
    # One row per response, or one per prompt holding its M responses (shared prompts).
    f = (
        forward.forward_flops(TINY, P, T + M * R)
        if shared
        else forward.forward_flops(TINY, P * M, T + R)
    )
    # A forward that unembeds only the response positions.
    forward_ = f["dense"] + f["attention"] + 2 * TINY.embed_dim * TINY.vocab_size * P * M * R
    flops = bench_train.train_flops(
        TINY, P, M, T, R, with_ref=with_ref, with_old=with_old, shared=shared
    )
    assert flops["policy forward + backward"] == 3 * forward_
    assert ("old log-prob forward" in flops) == with_old
    assert ("reference forward" in flops) == with_ref
    assert flops["total"] == (3 + with_old + with_ref) * forward_


def test_sizes_and_models_reject_bad_input_with_the_fix():
    assert bench_train.TrainSize.parse("8x8x64x64") == bench_train.TrainSize(8, 8, 64, 64)
    with pytest.raises(ValueError, match="PxMxTxR"):
        bench_train.TrainSize.parse("8x8x64")
    with pytest.raises(ValueError, match="M >= 2"):
        bench_train.TrainSize.parse("8x1x64x64")
    assert models.preset_name("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M"
    with pytest.raises(ValueError, match="neither a preset"):
        models.load(parse(["train", "--model", "no/such-model"]), "float32")


@pytest.mark.slow
def test_train_bench_tiny(capsys, monkeypatch):
    # The machine figures have their own cost (seconds of 2048² matmuls); not what is tested here.
    monkeypatch.setattr(machine, "measure_matmul_peak", lambda **_: 1e9)
    monkeypatch.setattr(machine, "measure_memory_bandwidth", lambda **_: 1e9)
    args = parse(
        ["train", "--model", "smollm2-135m", "--layers", "1", "--vocab", "64",
         "--sizes", "2x2x4x4", "--repeats", "1"]
    )  # fmt: skip
    (result,) = args.run(args).values()
    out = capsys.readouterr().out
    assert "tokens/s ratio ttrl_jax / transformers: " in out
    assert "where the time goes" in out and profile.OPTIMIZER in out
    assert result["ratio"] > 0 and result["peak_fraction"] > 0
    # Both sides compute the same log-probs, loss and gradient, and the whole first step agrees.
    assert result["logp_diff"] < 1e-4
    assert result["loss_diff"] < 1e-5
    assert result["grad_norm_rel_diff"] < 1e-4
    assert result["step_loss_diff"] < 1e-5
