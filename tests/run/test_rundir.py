"""run/rundir.py: one run a folder, its lock, and the resume rules."""

import os
import shutil
import subprocess

import pytest

from ttrl_jax.run import loop as run_lib
from ttrl_jax.run import rundir as rundir_lib


def test_second_run_on_one_folder_refuses(toy_run, tiny_hf_model, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    with rundir_lib.lock(str(out)), pytest.raises(SystemExit) as exit_info:
        run_lib.main(toy_run.args(tiny_hf_model, data_file, out))
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


def test_resume_refuses_a_changed_config(
    toy_run, full_run, tiny_hf_model, data_file, tmp_path, capsys
):
    full_out, _ = full_run
    out = tmp_path / "run"
    shutil.copytree(full_out, out)
    args = toy_run.args(tiny_hf_model, data_file, out, "run.resume=true", "optim.lr=0.5")
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
def test_resume_with_nothing_to_resume_says_so(toy_run, tiny_hf_model, data_file, tmp_path):
    out = tmp_path / "run"
    args = toy_run.args(tiny_hf_model, data_file, out, "run.resume=true", "run.max_steps=1")
    proc = toy_run.start([*args, "eval.before_training=false", "run.export_hf=false"])
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    assert "nothing to resume" in log
    steps = [(r["step"], "train" in r or "eval" in r) for r in toy_run.records(out)]
    assert [s for s, trained_or_eval in steps if trained_or_eval] == [1, 1]  # train, final eval
