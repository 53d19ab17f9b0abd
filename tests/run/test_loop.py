"""run/loop.py, the TTRL job end to end: outputs, kill-and-resume equality, label-free decisions,
bad-input errors, a NaN stop."""

import json
import os
import shutil
import signal
import time

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ttrl_jax import vote_replay
from ttrl_jax.data import toy_task as task
from ttrl_jax.rl import train as train_lib
from ttrl_jax.run import checkpoint as checkpoint_lib
from ttrl_jax.run import loop as run_lib


@pytest.mark.slow
def test_run_writes_every_output(toy_run, full_run):
    out, log = full_run
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "summary.md", "hf/config.json"):
        assert (out / name).exists(), name
    rows = toy_run.records(out)
    trains = [r for r in rows if r.get("train")]
    evals = [r for r in rows if r.get("eval")]
    assert [r["step"] for r in trains] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in evals] == [0, 2, 4, 5]
    for key in ("label_accuracy", "reward_accuracy", "majority_ratio", "entropy", "kl", "lr"):
        assert key in trains[0]
    for key in ("eval/avg@2", "eval/maj@2", "eval/pass@2", "eval/greedy"):
        assert key in evals[0]
    # A prompt's row in the update, packed at real lengths: fewer than T + M·R = 128 + 2 x 12
    # positions (the prompts are shorter than their 128-token bucket), a multiple of 32.
    rows = [r["packed_row_length"] for r in trains]
    assert all(n % 32 == 0 and n < 128 + 2 * 12 for n in rows), rows
    assert "avg@2" in log and "outputs in" in log


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted_run(
    toy_run, full_run, tiny_hf_model, data_file, tmp_path
):
    full_out, _ = full_run
    out = tmp_path / "run"
    proc = toy_run.start(toy_run.args(tiny_hf_model, data_file, out))
    deadline = time.time() + 600
    while not (out / "checkpoints" / "2").is_dir():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (out / "hf").exists()  # it really stopped before the end

    resumed = toy_run.start(toy_run.args(tiny_hf_model, data_file, out, "run.resume=true"))
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, log
    assert "resumed from" in log
    assert toy_run.records(out) == toy_run.records(full_out)
    ours, theirs = (
        load_file(out / "hf/model.safetensors"),
        load_file(full_out / "hf/model.safetensors"),
    )
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert (ours[name] == theirs[name]).all(), name


BIG_BATCH = ["data.batch_prompts=16", "optim.mini_batch_prompts=16", "data.last_batch=wrap"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("sample.n_votes=3", "unknown key 'sample.n_votes'"),
        ("sample.n_vote=many", "sample.n_vote"),
        ("data.path=/nonexistent/file.json", "/nonexistent/file.json"),
        ("data.name=aime25", "aime25"),
        ("data.max_prompt_tokens=20", "data.max_prompt_tokens"),
    ],
)
def test_bad_input_gives_a_clear_error(override, message, tiny_hf_model, data_file, tmp_path,
                                       capsys):  # fmt: skip
    args = [
        f"model.name_or_path={tiny_hf_model}", f"run.out_dir={tmp_path}", "run.tensorboard=false",
        "sample.prompt_buckets=[128]", f"data.path={data_file}", *BIG_BATCH, override,
    ]  # fmt: skip
    if override.startswith("data.name"):
        args.remove(f"data.path={data_file}")
    with pytest.raises(SystemExit) as exc:
        run_lib.main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_field_names_are_named(tiny_hf_model, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question_text": "1+1?", "solution": "2"}]))
    with pytest.raises(SystemExit):
        run_lib.main([f"model.name_or_path={tiny_hf_model}", f"data.path={bad}",
                      f"run.out_dir={tmp_path}/out", *BIG_BATCH])  # fmt: skip
    err = capsys.readouterr().err
    assert "question_text" in err and "prompt" in err


def test_existing_run_needs_resume(full_run, capsys):
    out, _ = full_run
    with pytest.raises(SystemExit):
        run_lib.main([f"run.out_dir={out}"])
    assert "--resume" in capsys.readouterr().err


@pytest.mark.slow
def test_adaptive_vote_run(toy_run, data_file, tmp_path):
    # The packaged toy model (it answers, so votes settle) on 6 prompts, three ways: the fixed
    # budget, the posterior rule with the audit, and the lead rule. Each adaptive prompt draws
    # between n_vote_min and n_vote responses, the drawn ones are the full draw's in the same
    # slots, and the train step runs on the ragged groups. The update's responses are drawn
    # first, so wherever a vote's label is the full budget's the update is the fixed budget's:
    # always for the lead rule (exact), at every step the audit finds agreeing for posterior.
    # The same up to float rounding: the old log-probs come from the sampler, whose rounds
    # decode other batch shapes than the fixed budget's one call.
    base = [
        "model.name_or_path=toy", f"data.path={data_file}", "sample.n_vote=8",
        "sample.n_train=2", "sample.n_vote_min=2", "sample.n_vote_step=2",
        "sample.max_new_tokens=48", "sample.prompt_buckets=[128]", "data.batch_prompts=2",
        "optim.mini_batch_prompts=1", "optim.lr=1e-3", "eval.k=1", "eval.greedy=false",
        "eval.max_new_tokens=48", "eval.before_training=false", "run.max_steps=3",
        "run.checkpoint_every=0", "run.tensorboard=false",
    ]  # fmt: skip
    rules = {
        "fixed": [],
        "posterior": ["ttrl.vote_rule=posterior", "ttrl.vote_error=0.1", "ttrl.vote_audit=true"],
        "lead": ["ttrl.vote_rule=lead"],
    }
    procs = {r: toy_run.start([*base, f"run.out_dir={tmp_path / r}", *a]) for r, a in rules.items()}
    trains = {}
    for rule, proc in procs.items():
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, log
        trains[rule] = [r for r in toy_run.records(tmp_path / rule) if r.get("train")]
        assert len(trains[rule]) == 3
    for r in trains["posterior"]:
        assert all(2 <= v <= 8 for v in r["votes_per_prompt"])
        assert r["votes_drawn"] == pytest.approx(sum(r["votes_per_prompt"]) / 2)
        assert r["audit/same_responses"] == 1.0
        assert r["sample_tokens"] <= r["audit/sample_tokens_full"]
        assert 0 <= r["audit/label_agreement"] <= 1 and r["vote_rounds"] >= 1
        assert r["votes_saved"] == pytest.approx(1 - sum(r["votes_per_prompt"]) / 16)
    assert min(v for r in trains["posterior"] for v in r["votes_per_prompt"]) < 8
    assert min(v for r in trains["lead"] for v in r["votes_per_prompt"]) < 8

    def same(a, b):
        for key in ("reward_mean", "label_accuracy"):  # of the trained responses, the labels
            assert a[key] == b[key], key
        for key in ("loss", "grad_norm", "param_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-7), key

    agreed, diverged = 0, False  # posterior steps before the first label that differs
    for fixed, lead, post in zip(trains["fixed"], trains["lead"], trains["posterior"]):
        same(lead, fixed)
        diverged = diverged or post["audit/label_agreement"] < 1
        if not diverged:
            same(post, fixed)
            agreed += 1
    # The fixed run's recorded votes replayed (python -m ttrl_jax.vote_replay) draw what each
    # adaptive run drew while it was the fixed run.
    for rule, overrides, steps in (("lead", [], 3), ("posterior", ["ttrl.vote_error=0.1"], agreed)):
        _, replay = vote_replay.replay_run(
            str(tmp_path / "fixed"), [f"ttrl.vote_rule={rule}", *overrides]
        )
        drawn = [r["votes_per_prompt"] for r in trains[rule]]
        assert [s["votes"] for s in replay][:steps] == drawn[:steps]


def label_free(rows):
    """The records without their gold metrics (and without the baseline's, which has some)."""
    gold = lambda k: k in train_lib.GOLD_METRICS or any(s in k for s in ("avg@", "maj@", "pass@"))
    return [
        {k: v for k, v in r.items() if not gold(k) and k not in ("eval/greedy", "audit/")}
        for r in rows
        if not r.get("baseline")
    ]


@pytest.mark.slow
def test_label_free_decisions_do_not_read_gold(toy_run, tmp_path):
    # The packaged toy model on 8 prompts, twice: with gold answers and with none. The judge
    # (keep=best, the plateau stop rule, the collapse guard) must decide the same, from the same
    # label-free signals, and the kept policy must be the same.
    items = task.test_split(seed=3, n=8)
    with_gold, without = tmp_path / "gold.json", tmp_path / "nogold.json"
    with_gold.write_text(json.dumps(items))
    without.write_text(json.dumps([{k: v for k, v in it.items() if k != "answer"} for it in items]))
    outs = []
    for data in (with_gold, without):
        out = tmp_path / data.stem
        proc = toy_run.start([
            "model.name_or_path=toy", f"data.path={data}", f"run.out_dir={out}",
            "sample.n_vote=4", "sample.n_train=2", "sample.max_new_tokens=40",
            "sample.prompt_buckets=[128]", "data.batch_prompts=4", "data.episodes=4",
            "optim.mini_batch_prompts=2", "optim.lr=5e-4", "eval.k=4", "eval.max_new_tokens=40",
            "eval.every_steps=1", "run.keep=best", "run.stop_rule=plateau",
            "run.stop_patience=2", "run.collapse_guard=lr", "run.collapse_entropy=0.9",
            "run.checkpoint_every=0", "run.export_hf=true", "run.tensorboard=false",
        ])  # fmt: skip
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, log
        outs.append(out)
    gold_rows, free_rows = toy_run.records(outs[0]), toy_run.records(outs[1])
    assert label_free(gold_rows) == label_free(free_rows)
    assert any("eval/avg@4" in r for r in gold_rows)
    assert not any(
        k.startswith("eval/avg@") or k in train_lib.GOLD_METRICS for r in free_rows for k in r
    )
    assert all("eval/echo" in r for r in free_rows if r.get("eval"))  # toy questions hold numbers
    result = next(r for r in free_rows if r.get("result"))
    assert isinstance(result["kept_step"], int)
    assert toy_run.same_weights(outs[0], outs[1])
    summary = (outs[1] / "summary.md").read_text()
    assert "Kept:" in summary and "Token-matched baseline" in summary


def nan_model(src, dst):
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    name = next(k for k in tensors if "mlp" in k)
    tensors[name] = np.full_like(tensors[name], np.nan)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.slow
def test_nan_stops_the_run_before_saving(toy_run, tiny_hf_model, data_file, tmp_path):
    model = tmp_path / "nan_model"
    nan_model(tiny_hf_model, model)
    out = tmp_path / "run"
    proc = toy_run.start(toy_run.args(str(model), data_file, out, "eval.before_training=false"))
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, log
    assert "step 1: " in log and "is not finite" in log and "no checkpoint was saved" in log
    assert "Traceback" not in log
    assert checkpoint_lib.Checkpointer(str(out / "checkpoints")).all_steps() == []
    assert not (out / "hf").exists()


def test_mesh_larger_than_the_machine_names_the_device_count(capsys):
    with pytest.raises(SystemExit):
        run_lib.main(["--mesh", "3x3"])
    err = capsys.readouterr().err
    assert f"needs 9 devices but {jax.device_count()} are available" in err
