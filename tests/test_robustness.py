"""A run in a hostile world: signals, damaged checkpoints, NaNs, a second writer, full disks."""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from test_run import data_file, full_run, records, run_args, subprocess_run  # noqa: F401

from ttrl_jax.rl import train as train_lib
from ttrl_jax.run import checkpoint as checkpoint_lib
from ttrl_jax.run import loop as run_lib
from ttrl_jax.run import rundir as rundir_lib


def same_weights(a, b):
    ours, theirs = load_file(a / "hf/model.safetensors"), load_file(b / "hf/model.safetensors")
    return ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)


# Runs ttrl_jax.run with a SIGTERM that arrives while a chosen step trains or evaluates, so the
# test knows where the signal lands (one from outside lands wherever the machine has got to).
SIGTERM_IN = """
import os, signal, sys
from ttrl_jax.run import loop as run
from ttrl_jax.run import step
phase, at = os.environ["SIGTERM_IN"].split(":")
train_step, eval_tasks, evals = step.ttrl_step, run.evaluate_lib.evaluate_tasks, []
def ttrl_step(job, root, step):
    if phase == "train" and step + 1 == int(at):
        os.kill(os.getpid(), signal.SIGTERM)
    return train_step(job, root, step)
def evaluate_tasks(*args):
    evals.append(1)  # the evals of steps 0, 2, 4, 5
    if phase == "eval" and len(evals) == int(at):
        os.kill(os.getpid(), signal.SIGTERM)
    return eval_tasks(*args)
step.ttrl_step, run.evaluate_lib.evaluate_tasks = ttrl_step, evaluate_tasks
run.main(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "sigterm_in, stop_step",
    [("train:2", 2), ("train:3", 3), ("eval:2", 2)],
    ids=["at-an-eval-step", "between-evals", "during-an-eval"],
)
def test_sigterm_saves_and_resume_is_exact(
    sigterm_in, stop_step, full_run, tiny_hf_model, data_file, tmp_path  # noqa: F811
):  # fmt: skip
    full_out, _ = full_run
    out = tmp_path / "run"
    # No step cadence and no time cadence: only the signal can make a checkpoint.
    args = run_args(tiny_hf_model, data_file, out, "run.checkpoint_every=0")
    args.append("run.checkpoint_minutes=0")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["SIGTERM_IN"] = sigterm_in
    proc = subprocess.run(
        [sys.executable, "-c", SIGTERM_IN, *args],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 128 + signal.SIGTERM, log
    assert f"stopped by SIGTERM after step {stop_step}" in log and "continue with --resume" in log
    assert "Traceback" not in log
    saved = checkpoint_lib.Checkpointer(str(out / "checkpoints")).all_steps()
    assert saved == [stop_step]
    assert not (out / "hf").exists()

    # A signal in step 2's training leaves its eval to the resumed run; one during the eval
    # (of step 2, the second) stops the run after it.
    resumed = subprocess_run([*args, "run.resume=true"])
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, log
    assert f"resumed from {out} at step {stop_step}" in log
    assert records(out) == records(full_out)
    assert same_weights(out, full_out)


def flip_bytes(folder):
    """Flips 64 bytes in the middle of the largest file under `folder`."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
    path = max(files, key=os.path.getsize)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        chunk = f.read(64)
        f.seek(-len(chunk), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in chunk))


def truncate_file(folder):
    files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
    path = max(files, key=os.path.getsize)
    os.truncate(path, os.path.getsize(path) // 3)


@pytest.mark.slow
@pytest.mark.parametrize("damage", [flip_bytes, truncate_file])
def test_damaged_newest_checkpoint_falls_back(damage, full_run, tiny_hf_model, data_file, tmp_path):  # noqa: F811
    full_out, _ = full_run
    out = tmp_path / "run"
    shutil.copytree(full_out, out)
    assert checkpoint_lib.Checkpointer(str(out / "checkpoints")).all_steps() == [4, 5]
    damage(out / "checkpoints" / "5")
    # A torn last metrics line (a kill mid-write) must not block the resume either.
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train": tr')
    proc = subprocess_run(run_args(tiny_hf_model, data_file, out, "run.resume=true"))
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    assert "checkpoint step 5" in log and "falling back to step 4" in log
    assert "dropped a torn last line" in log
    assert f"resumed from {out} at step 4" in log
    assert records(out) == records(full_out)
    assert same_weights(out, full_out)


def nan_model(src, dst):
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    name = next(k for k in tensors if "mlp" in k)
    tensors[name] = np.full_like(tensors[name], np.nan)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.slow
def test_nan_stops_the_run_before_saving(tiny_hf_model, data_file, tmp_path):  # noqa: F811
    model = tmp_path / "nan_model"
    nan_model(tiny_hf_model, model)
    out = tmp_path / "run"
    proc = subprocess_run(run_args(str(model), data_file, out, "eval.before_training=false"))
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, log
    assert "step 1: " in log and "is not finite" in log and "no checkpoint was saved" in log
    assert "Traceback" not in log
    assert checkpoint_lib.Checkpointer(str(out / "checkpoints")).all_steps() == []
    assert not (out / "hf").exists()


def test_second_run_on_one_folder_refuses(tiny_hf_model, data_file, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    with rundir_lib.lock(str(out)), pytest.raises(SystemExit) as exit_info:
        run_lib.main(run_args(tiny_hf_model, data_file, out))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "is in use by a run that is still going" in err and f"pid {os.getpid()}" in err
    with rundir_lib.lock(str(out)):  # released when the holder is done: never stale
        pass


def test_lock_is_released_when_the_holder_dies(tmp_path):
    code = (
        "from ttrl_jax.run import rundir; import os\n"
        f"with rundir.lock({str(tmp_path)!r}): os._exit(1)"
    )
    subprocess.run(["python", "-c", code], check=False)
    with rundir_lib.lock(str(tmp_path)):
        pass


def test_resume_refuses_a_changed_config(full_run, tiny_hf_model, data_file, tmp_path, capsys):  # noqa: F811
    full_out, _ = full_run
    out = tmp_path / "run"
    shutil.copytree(full_out, out)
    args = run_args(tiny_hf_model, data_file, out, "run.resume=true", "optim.lr=0.5")
    with pytest.raises(SystemExit) as exit_info:
        run_lib.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "optim.lr: 0.001 -> 0.5" in err and "run.accept_config_change=true" in err
    # Harmless differences (logging, checkpoint cadence) are accepted.
    saved = rundir_lib.config_lib.load_config(out / "config.yaml")
    import dataclasses

    harmless = dataclasses.replace(
        saved, run=dataclasses.replace(saved.run, keep_checkpoints=7, checkpoint_minutes=1.0)
    )
    assert rundir_lib.config_changes(saved, harmless) == []


@pytest.mark.slow
def test_resume_with_nothing_to_resume_says_so(tiny_hf_model, data_file, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    args = run_args(tiny_hf_model, data_file, out, "run.resume=true", "run.max_steps=1")
    proc = subprocess_run([*args, "eval.before_training=false", "run.export_hf=false"])
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    assert "nothing to resume" in log
    steps = [(r["step"], "train" in r or "eval" in r) for r in records(out)]
    assert [s for s, trained_or_eval in steps if trained_or_eval] == [1, 1]  # train, final eval


# ----------------------------------------------------------------------------- the checkpointer


def tiny_state(n=1000):
    params = {"w": jnp.arange(n, dtype=jnp.float32)}
    return train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=())


def test_checkpoints_carry_checksums_and_damage_is_skipped(tmp_path):
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "c"), keep=3)
    for step in (1, 2, 3):
        ckpt.save(step, tiny_state(), {"steps_done": step})
    ckpt.close()
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "c"), keep=3)
    assert [ckpt.verify(s) for s in (1, 2, 3)] == [None, None, None]
    flip_bytes(tmp_path / "c" / "3")
    shutil.rmtree(tmp_path / "c" / "2" / "state")
    assert "fail their checksum" in ckpt.verify(3)
    assert "is missing" in ckpt.verify(2)
    abstract = checkpoint_lib.abstract_like(tiny_state())
    state, record, step = ckpt.restore_latest(abstract)
    assert step == 1 and record["steps_done"] == 1
    np.testing.assert_array_equal(state.params["w"], np.arange(1000, dtype=np.float32))


def test_non_finite_checkpoint_is_skipped(tmp_path):
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "c"), keep=3)
    ckpt.save(1, tiny_state(), {"steps_done": 1})
    bad = tiny_state()
    ckpt.save(2, bad.replace(params={"w": bad.params["w"].at[3].set(jnp.inf)}), {"steps_done": 2})
    ckpt.close()
    found = checkpoint_lib.Checkpointer(str(tmp_path / "c")).restore_latest(
        checkpoint_lib.abstract_like(tiny_state())
    )
    assert found[2] == 1


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True
        ).returncode
    ):
        pytest.skip("a full disk is simulated with a small tmpfs, which needs root to mount")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_full_disk_is_reported_and_the_partial_save_removed(small_disk):
    ckpt = checkpoint_lib.Checkpointer(str(small_disk / "c"), keep=2)
    ckpt.save(1, tiny_state(1000), {"steps_done": 1})  # 4 kB of params: fits
    ckpt.wait()
    with pytest.raises(checkpoint_lib.CheckpointError, match="checkpoint step 2 failed"):
        ckpt.save(2, tiny_state(1 << 20), {"steps_done": 2})  # 4 MB: does not
        ckpt.wait()
    leftovers = [n for n in os.listdir(small_disk / "c") if n != "1"]
    assert leftovers == [], leftovers
    assert ckpt.verify(1) is None
    ckpt.close(quiet=True)


def test_cadence_by_steps_time_and_end():
    cadence = checkpoint_lib.Cadence(every_steps=3, minutes=0, total_steps=7)
    assert [d for d in range(1, 8) if cadence.due(d)] == [3, 6, 7]
    timed = checkpoint_lib.Cadence(every_steps=0, minutes=1e-9, total_steps=100)
    time.sleep(0.01)
    assert timed.due(1)
    timed.saved()
    assert not checkpoint_lib.Cadence(0, 0, 100).due(5)


def test_mesh_larger_than_the_machine_names_the_device_count(capsys):
    with pytest.raises(SystemExit):
        run_lib.main(["--mesh", "3x3"])
    err = capsys.readouterr().err
    assert f"needs 9 devices but {jax.device_count()} are available" in err
