"""run/preemption.py: a SIGTERM while a step trains or evaluates saves, and the resumed run
equals the uninterrupted one."""

import os
import signal
import subprocess
import sys
import time

import pytest

from ttrl_jax.run import checkpoint as checkpoint_lib
from ttrl_jax.run import preemption

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
    toy_run, sigterm_in, stop_step, full_run, tiny_hf_model, data_file, tmp_path
):  # fmt: skip
    full_out, _ = full_run
    out = tmp_path / "run"
    # No step cadence and no time cadence: only the signal can make a checkpoint.
    args = toy_run.args(tiny_hf_model, data_file, out, "run.checkpoint_every=0")
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
    resumed = toy_run.start([*args, "run.resume=true"])
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, log
    assert f"resumed from {out} at step {stop_step}" in log
    assert toy_run.records(out) == toy_run.records(full_out)
    assert toy_run.same_weights(out, full_out)


def test_a_signal_is_recorded_and_a_second_one_stops_at_once(capsys):
    before = signal.getsignal(signal.SIGTERM)
    with preemption.StopRequests() as stop:
        assert stop.requested() is None
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # the handler runs in this thread at its next instruction
        assert stop.requested() == signal.SIGTERM
        with pytest.raises(preemption.Stopped) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
        assert stopped.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before
    assert "SIGTERM: finishing this step" in capsys.readouterr().err
