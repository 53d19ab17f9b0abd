"""tpu_scripts/launch.sh: the run's command on every worker, and what a worker runs."""

import os
import re
import shlex
import subprocess

import pytest

LAUNCH_EXTRA = ["ttrl.n_vote=64", "run.note=hello world", "q=it's & $HOME"]


def test_launch(scripts, bash_only_path):
    args = ["--name", "t1", "--zone", "z", "--mesh", "2x4", "--config", "configs/x.yaml"]
    args += ["--run-name", "r1", "--env", "A=1 2"]
    (cmd,) = scripts.dry_run("launch.sh", *args, "--", *LAUNCH_EXTRA, path=bash_only_path)
    assert cmd[:8] == scripts.SSH_ALL_T1
    remote = scripts.remote_command(cmd)
    assert '"$HOME/ttrl_runs/r1"' in remote and "worker-$worker.log" in remote
    # The run's command line, split by the worker's shell, keeps every argument whole.
    (nohup_part,) = [part for part in remote.split("; ") if part.startswith("nohup ")]
    words = shlex.split(nohup_part.split(" >")[0])
    assert words == ["nohup", "env", "PYTHONUNBUFFERED=1", "A=1 2", "python3", "-m",
                     "ttrl_jax.run", "--mesh", "2x4", "--config", "configs/x.yaml",
                     *LAUNCH_EXTRA]  # fmt: skip


def test_launch_default_run_name_is_a_timestamp(scripts, bash_only_path):
    (cmd,) = scripts.dry_run("launch.sh", *scripts.VALID_ARGS["launch.sh"], path=bash_only_path)
    assert re.search(r'ttrl_runs/run-\d{8}-\d{6}"', scripts.remote_command(cmd))


def test_launch_accepts_auto_mesh(scripts, bash_only_path):
    args = ["--name", "t1", "--zone", "z", "--mesh", "auto"]
    (cmd,) = scripts.dry_run("launch.sh", *args, path=bash_only_path)
    assert "ttrl_jax.run --mesh auto " in scripts.remote_command(cmd)


@pytest.mark.parametrize("mesh", ["8", "2x", "0x4", "2x4x2", "axb"])
def test_launch_rejects_bad_mesh(scripts, mesh, bash_only_path):
    proc = scripts.run("launch.sh", "--name", "t1", "--zone", "z", "--mesh", mesh, "--dry-run",
                      path=bash_only_path)  # fmt: skip
    assert proc.returncode != 0
    assert "--mesh" in proc.stderr


def test_launch_rejects_arguments_before_the_separator(scripts, bash_only_path):
    proc = scripts.run("launch.sh", *scripts.VALID_ARGS["launch.sh"], "ttrl.n_vote=64", "--dry-run",
                      path=bash_only_path)  # fmt: skip
    assert proc.returncode != 0
    assert "after --" in proc.stderr


@pytest.fixture
def worker_home(scripts, tmp_path):
    """A fake worker: home directory with a code checkout and fake python3/curl/hostname."""
    home = tmp_path / "home"
    (home / "ttrl_jax").mkdir(parents=True)
    bin_dir = tmp_path / "fake_bin"
    bin_dir.mkdir()
    scripts.write_exe(bin_dir / "python3", scripts.FAKE_PYTHON)
    return home, bin_dir


def _run_on_fake_worker(scripts, remote, home, bin_dir, env_extra):
    env = {k: v for k, v in os.environ.items() if k != "TPU_WORKER_ID"}
    env.update(HOME=str(home), PATH=f"{bin_dir}:{os.environ['PATH']}", **env_extra)
    return subprocess.run(
        [scripts.BASH, "-c", remote], capture_output=True, text=True, env=env, cwd=home, timeout=60
    )


@pytest.mark.parametrize(
    "env_extra, curl, hostname, worker_id",
    [
        ({"TPU_WORKER_ID": "3"}, None, None, "3"),
        ({}, "echo 5", None, "5"),
        ({}, "exit 22", "echo t1v-n-0a1b2c3d-w-2", "2"),
    ],
)
def test_launch_remote_command_runs_on_a_worker(
    scripts, worker_home, bash_only_path, env_extra, curl, hostname, worker_id
):
    home, bin_dir = worker_home
    if curl:
        scripts.write_exe(bin_dir / "curl", f"#!/bin/bash\n{curl}\n")
    if hostname:
        scripts.write_exe(bin_dir / "hostname", f"#!/bin/bash\n{hostname}\n")
    args = ["--name", "t1", "--zone", "z", "--mesh", "2x4", "--run-name", "r1"]
    (cmd,) = scripts.dry_run("launch.sh", *args, "--", *LAUNCH_EXTRA, path=bash_only_path)
    proc = _run_on_fake_worker(scripts, scripts.remote_command(cmd), home, bin_dir, env_extra)
    assert proc.returncode == 0, proc.stderr
    assert f"worker {worker_id}: started" in proc.stdout

    run_dir = home / "ttrl_runs" / "r1"
    log = scripts.wait_for_text(run_dir / f"worker-{worker_id}.log", "DONE")
    args_seen = re.findall(r"^ARG=(.*)$", log, flags=re.M)
    assert args_seen == ["-m", "ttrl_jax.run", "--mesh", "2x4", *LAUNCH_EXTRA]
    assert f"CWD={home / 'ttrl_jax'}" in log and "UNBUFFERED=1" in log
    assert (run_dir / f"worker-{worker_id}.pid").read_text().strip().isdigit()
    assert os.readlink(home / "ttrl_runs" / "latest") == "r1"


def test_launch_refuses_to_reuse_a_running_run(scripts, worker_home, bash_only_path):
    home, bin_dir = worker_home
    run_dir = home / "ttrl_runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "worker-0.pid").write_text(f"{os.getpid()}\n")  # a live process
    args = ["--name", "t1", "--zone", "z", "--mesh", "1x4", "--run-name", "r1"]
    (cmd,) = scripts.dry_run("launch.sh", *args, path=bash_only_path)
    proc = _run_on_fake_worker(
        scripts, scripts.remote_command(cmd), home, bin_dir, {"TPU_WORKER_ID": "0"}
    )
    assert proc.returncode != 0
    assert "still running" in proc.stderr
    assert not (run_dir / "worker-0.log").exists()


def test_launch_on_a_worker_without_setup_says_so(scripts, tmp_path, bash_only_path):
    home = tmp_path / "home"
    home.mkdir()
    (cmd,) = scripts.dry_run("launch.sh", *scripts.VALID_ARGS["launch.sh"], path=bash_only_path)
    proc = _run_on_fake_worker(
        scripts, scripts.remote_command(cmd), home, tmp_path, {"TPU_WORKER_ID": "0"}
    )
    assert proc.returncode != 0
    assert "run setup.sh first" in proc.stderr
    assert not (home / "ttrl_runs").exists()
