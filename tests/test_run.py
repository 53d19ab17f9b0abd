"""The TTRL job end to end: outputs, kill-and-resume equality, and bad-input errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.numpy import load_file

from ttrl_jax.data import toy_task as task
from ttrl_jax.rl import train as train_lib
from ttrl_jax.run import loop as run_lib
from ttrl_jax.run import rollout as rollout_lib

TIMING_KEYS = ("time_sample", "time_reward", "time_train", "sample_tokens_per_s")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "toy.json"
    path.write_text(json.dumps(task.test_split(seed=1, n=6)))
    return str(path)


def run_args(model, data, out_dir, *extra):
    return [
        f"model.name_or_path={model}", f"data.path={data}", f"run.out_dir={out_dir}",
        "sample.n_vote=4", "sample.n_train=2", "sample.max_new_tokens=12",
        "sample.prompt_buckets=[128]", "data.batch_prompts=2", "data.episodes=2",
        "optim.mini_batch_prompts=1", "optim.lr=1e-3", "eval.k=2", "eval.max_new_tokens=12",
        "eval.every_steps=2", "run.checkpoint_every=1", "run.max_steps=5", "run.export_hf=true",
        "run.tensorboard=false", *extra,
    ]  # fmt: skip


def subprocess_run(args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.Popen(
        [sys.executable, "-m", "ttrl_jax.run", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def full_run(tiny_hf_model, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    proc = subprocess_run(run_args(tiny_hf_model, data_file, out))
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    return out, log


def records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


@pytest.mark.slow
def test_run_writes_every_output(full_run):
    out, log = full_run
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "summary.md", "hf/config.json"):
        assert (out / name).exists(), name
    rows = records(out)
    trains = [r for r in rows if r.get("train")]
    evals = [r for r in rows if r.get("eval")]
    assert [r["step"] for r in trains] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in evals] == [0, 2, 4, 5]
    for key in ("label_accuracy", "reward_accuracy", "majority_ratio", "entropy", "kl", "lr"):
        assert key in trains[0]
    for key in ("eval/avg@2", "eval/maj@2", "eval/pass@2", "eval/greedy"):
        assert key in evals[0]
    assert "avg@2" in log and "outputs in" in log


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted_run(full_run, tiny_hf_model, data_file, tmp_path):
    full_out, _ = full_run
    out = tmp_path / "run"
    proc = subprocess_run(run_args(tiny_hf_model, data_file, out))
    deadline = time.time() + 600
    while not (out / "checkpoints" / "2").is_dir():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (out / "hf").exists()  # it really stopped before the end

    resumed = subprocess_run(run_args(tiny_hf_model, data_file, out, "run.resume=true"))
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, log
    assert "resumed from" in log
    assert records(out) == records(full_out)
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


def test_response_bucket():
    assert rollout_lib.response_bucket(1, 3072) == 768
    assert rollout_lib.response_bucket(769, 3072) == 1536
    assert rollout_lib.response_bucket(3072, 3072) == 3072
    assert rollout_lib.response_bucket(10, 12) == 12


@pytest.mark.slow
def test_adaptive_vote_run(data_file, tmp_path):
    # The packaged toy model (it answers, so votes settle) on 6 prompts: the posterior rule
    # with the audit. Each prompt draws between n_vote_min and n_vote responses, the drawn ones
    # are exactly the full draw's prefixes, and the train step runs on the ragged groups.
    out = tmp_path / "run"
    proc = subprocess_run([
        "model.name_or_path=toy", f"data.path={data_file}", f"run.out_dir={out}",
        "sample.n_vote=8", "sample.n_train=2", "sample.n_vote_min=2", "sample.n_vote_step=2",
        "sample.max_new_tokens=48", "sample.prompt_buckets=[128]", "data.batch_prompts=2",
        "optim.mini_batch_prompts=1", "ttrl.vote_rule=posterior", "ttrl.vote_error=0.1",
        "ttrl.vote_audit=true", "eval.k=1", "eval.greedy=false", "eval.max_new_tokens=48",
        "eval.before_training=false", "run.max_steps=2", "run.checkpoint_every=0",
        "run.tensorboard=false",
    ])  # fmt: skip
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    trains = [r for r in records(out) if r.get("train")]
    assert len(trains) == 2
    votes = [v for r in trains for v in r["votes_per_prompt"]]
    assert all(2 <= v <= 8 for v in votes) and min(votes) < 8
    for r in trains:
        assert r["votes_drawn"] == pytest.approx(sum(r["votes_per_prompt"]) / 2)
        assert r["audit/same_responses"] == 1.0
        assert r["sample_tokens"] <= r["audit/sample_tokens_full"]
        assert 0 <= r["audit/label_agreement"] <= 1 and r["vote_rounds"] >= 1
        assert r["votes_saved"] == pytest.approx(1 - sum(r["votes_per_prompt"]) / 16)


def label_free(rows):
    """The records without their gold metrics (and without the baseline's, which has some)."""
    gold = lambda k: k in train_lib.GOLD_METRICS or any(s in k for s in ("avg@", "maj@", "pass@"))
    return [
        {k: v for k, v in r.items() if not gold(k) and k not in ("eval/greedy", "audit/")}
        for r in rows
        if not r.get("baseline")
    ]


@pytest.mark.slow
def test_label_free_decisions_do_not_read_gold(tmp_path):
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
        proc = subprocess_run([
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
    gold_rows, free_rows = records(outs[0]), records(outs[1])
    assert label_free(gold_rows) == label_free(free_rows)
    assert any("eval/avg@4" in r for r in gold_rows)
    assert not any(
        k.startswith("eval/avg@") or k in train_lib.GOLD_METRICS for r in free_rows for k in r
    )
    assert all("eval/echo" in r for r in free_rows if r.get("eval"))  # toy questions hold numbers
    result = next(r for r in free_rows if r.get("result"))
    assert isinstance(result["kept_step"], int)
    assert same_hf_weights(outs[0], outs[1])
    summary = (outs[1] / "summary.md").read_text()
    assert "Kept:" in summary and "Token-matched baseline" in summary


def same_hf_weights(a, b):
    ours, theirs = load_file(a / "hf/model.safetensors"), load_file(b / "hf/model.safetensors")
    return ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)
