"""Tests for the Cloud TPU scripts in tpu_scripts/: help, dry-run commands, errors, and the
commands the workers run (executed here with fake gcloud, python3, curl and hostname)."""

import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parent.parent / "tpu_scripts"
BASH = shutil.which("bash")
SCRIPTS = ["create.sh", "setup.sh", "launch.sh", "logs.sh", "delete.sh"]
SSH_ALL_T1 = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t1", "--worker=all", "--zone=z"]

# Complete, valid arguments for each script (without --dry-run).
VALID_ARGS = {
    "create.sh": ["--name", "ttrl-v4", "--zone", "us-central2-b", "--type", "v4-8"],
    "setup.sh": ["--name", "ttrl-v4", "--zone", "us-central2-b", "--repo", "https://x/r.git"],
    "launch.sh": ["--name", "ttrl-v4", "--zone", "us-central2-b", "--mesh", "1x4"],
    "logs.sh": ["--name", "ttrl-v4", "--zone", "us-central2-b"],
    "delete.sh": ["--name", "ttrl-v4", "--zone", "us-central2-b"],
}

# A worker's side of a TPU, for the end-to-end test: a python3 that records pip calls and
# prints the arguments of anything else it runs.
FAKE_PYTHON = r"""#!/bin/bash
if [ "$1" = -m ] && [ "$2" = pip ]; then printf '%s\n' "$*" >>"$HOME/pip.log"; exit 0; fi
printf 'ARG=%s\n' "$@"
echo "CWD=$PWD"
echo "UNBUFFERED=${PYTHONUNBUFFERED:-}"
echo DONE
"""

# A gcloud that emulates a TPU of $FAKE_WORKERS workers whose home directories are
# $FAKE_ROOT/worker-N: ssh runs the command in each, scp copies into or out of them.
FAKE_GCLOUD = r"""#!/bin/bash
set -euo pipefail
printf '%s\n' "$*" >>"$FAKE_ROOT/gcloud.log"
[ "$1 $2 $3" = "compute tpus tpu-vm" ] || exit 3
verb=$4
shift 4
worker=0 command="" pos=()
for a in "$@"; do
  case $a in
    --worker=*) worker=${a#--worker=} ;;
    --command=*) command=${a#--command=} ;;
    --*) ;;
    *) pos+=("$a") ;;
  esac
done
workers=$worker
[ "$worker" = all ] && workers=$(seq 0 $((FAKE_WORKERS - 1)))
case $verb in
  describe) for ((i = 0; i < FAKE_WORKERS; i++)); do echo "10.0.0.$i"; done ;;
  ssh)
    for w in $workers; do
      (cd "$FAKE_ROOT/worker-$w" && HOME="$FAKE_ROOT/worker-$w" TPU_WORKER_ID=$w bash -c "$command")
    done ;;
  scp)
    src=${pos[0]} dst=${pos[1]}
    for w in $workers; do
      if [[ $dst == *:* ]]; then cp "$src" "$FAKE_ROOT/worker-$w/${dst#*:}"
      else cp $FAKE_ROOT/worker-$w/${src#*:} "$dst"; fi  # unquoted: the remote expands globs
    done ;;
esac
"""


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def bash_only_path(tmp_path):
    """A PATH holding bash and nothing else: no gcloud, no coreutils."""
    bin_dir = tmp_path / "bash_only"
    bin_dir.mkdir()
    (bin_dir / "bash").symlink_to(BASH)
    return str(bin_dir)


def run_script(script, *args, path=None, cwd=None, env_extra=None):
    """Runs one script with bash; returns the CompletedProcess."""
    env = dict(os.environ)
    if path is not None:
        env["PATH"] = path
    env.update(env_extra or {})
    return subprocess.run(
        [BASH, str(SCRIPTS_DIR / script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )


def dry_run(script, *args, path):
    """Runs a script with --dry-run and returns its commands, each split like a shell would."""
    proc = run_script(script, "--dry-run", *args, path=path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines, "dry run printed no command"
    return [shlex.split(line) for line in lines]


def remote_command(tokens):
    """The value of the --command= flag of a gcloud ssh command."""
    (command,) = [t[len("--command=") :] for t in tokens if t.startswith("--command=")]
    return command


def wait_for_text(path: Path, text: str, deadline_s: float = 20.0) -> str:
    """Waits for a background process to write `text` into `path`; returns the file."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if path.exists() and text in path.read_text():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} never contained {text!r}")


# --- help ---------------------------------------------------------------------------------

HELP_OPTIONS = {
    "create.sh": ["--name", "--zone", "--type", "--version", "--spot", "--queued", "--project"],
    "setup.sh": ["--name", "--zone", "--repo", "--ref", "--copy", "--dir", "--python"],
    "launch.sh": ["--name", "--zone", "--mesh", "--config", "--run-name", "--env", "--dir"],
    "logs.sh": ["--name", "--zone", "--run-name", "--worker", "--follow", "--lines", "--out"],
    "delete.sh": ["--name", "--zone", "--queued", "--yes", "--project"],
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_usage_options_and_example(script, bash_only_path):
    proc = run_script(script, "--help", path=bash_only_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage:")
    for option in [*HELP_OPTIONS[script], "--dry-run", "--help"]:
        assert option in proc.stdout, f"{script} --help does not mention {option}"
    assert "Example:" in proc.stdout


# --- create.sh ----------------------------------------------------------------------------


def test_create_direct(bash_only_path):
    (cmd,) = dry_run("create.sh", *VALID_ARGS["create.sh"], path=bash_only_path)
    assert cmd == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "ttrl-v4",
        "--zone=us-central2-b", "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "tpu_type, version",
    [
        ("v4-16", "tpu-ubuntu2204-base"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5p-8", "v2-alpha-tpuv5"),
        ("v6e-8", "v2-alpha-tpuv6e"),
    ],
)
def test_create_picks_runtime_version_from_generation(tpu_type, version, bash_only_path):
    args = ["--name", "t1", "--zone", "z", "--type", tpu_type]
    (cmd,) = dry_run("create.sh", *args, path=bash_only_path)
    assert f"--accelerator-type={tpu_type}" in cmd
    assert f"--version={version}" in cmd


def test_create_version_override_spot_project_and_extra_flags(bash_only_path):
    args = ["--name=t1", "--zone=z", "--type=v4-8", "--version=my-image", "--spot"]
    args += ["--project", "proj", "--", "--description=my tpu"]
    (cmd,) = dry_run("create.sh", *args, path=bash_only_path)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "t1"]
    assert {"--zone=z", "--project=proj", "--version=my-image", "--spot"} <= set(cmd)
    assert cmd[-1] == "--description=my tpu"


def test_create_without_spot_has_no_spot_flag(bash_only_path):
    (cmd,) = dry_run("create.sh", *VALID_ARGS["create.sh"], path=bash_only_path)
    assert "--spot" not in cmd


def test_create_queued(bash_only_path):
    args = ["--name", "ttrl-v5e", "--zone", "us-west4-a", "--type", "v5litepod-16"]
    (cmd,) = dry_run("create.sh", *args, "--queued", "--spot", path=bash_only_path)
    assert cmd == [
        "gcloud", "compute", "tpus", "queued-resources", "create", "ttrl-v5e",
        "--node-id=ttrl-v5e", "--zone=us-west4-a", "--accelerator-type=v5litepod-16",
        "--runtime-version=v2-alpha-tpuv5-lite", "--spot",
    ]  # fmt: skip


def test_create_reports_device_count_for_mesh(bash_only_path):
    args = ["--name", "t1", "--zone", "z", "--type", "v4-16", "--dry-run"]
    proc = run_script("create.sh", *args, path=bash_only_path)
    assert proc.returncode == 0
    assert "8 JAX devices" in proc.stderr


@pytest.mark.parametrize(
    "tpu_type, message",
    [("v5e-16", "v5litepod-16"), ("tpu8", "not an accelerator type"), ("v9x-8", "--version")],
)
def test_create_rejects_bad_types(tpu_type, message, bash_only_path):
    proc = run_script("create.sh", "--name", "t1", "--zone", "z", "--type", tpu_type,
                      "--dry-run", path=bash_only_path)  # fmt: skip
    assert proc.returncode != 0
    assert message in proc.stderr


def test_create_rejects_invalid_tpu_name(bash_only_path):
    proc = run_script("create.sh", "--name", "My_TPU", "--zone", "z", "--type", "v4-8",
                      "--dry-run", path=bash_only_path)  # fmt: skip
    assert proc.returncode != 0
    assert "not a valid TPU name" in proc.stderr


# --- setup.sh -----------------------------------------------------------------------------


def test_setup_repo(bash_only_path):
    args = ["--name", "t1", "--zone", "z", "--repo", "https://github.com/o/ttrl_jax.git"]
    (cmd,) = dry_run("setup.sh", *args, "--ref", "v0.1", path=bash_only_path)
    assert cmd[:8] == SSH_ALL_T1
    remote = remote_command(cmd)
    assert "git clone https://github.com/o/ttrl_jax.git ttrl_jax" in remote
    assert "checkout --detach origin/v0.1" in remote
    assert 'python3 -m pip install -e ".[tpu]"' in remote


def test_setup_copy(tmp_path, bash_only_path):
    checkout = tmp_path / "my checkout"
    checkout.mkdir()
    (checkout / "pyproject.toml").write_text("")
    tar, scp, ssh, rm = dry_run("setup.sh", "--name", "t1", "--zone", "z", "--copy",
                                str(checkout), path=bash_only_path)  # fmt: skip
    tarball = tar[tar.index("-czf") + 1]
    assert tar[0] == "tar" and tar[-3:] == ["-C", str(checkout), "."]
    assert "--exclude=.git" in tar
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball,
                   "t1:ttrl_jax-src.tar.gz", "--worker=all", "--zone=z"]  # fmt: skip
    assert ssh[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t1", "--worker=all"]
    assert "tar -xzf ttrl_jax-src.tar.gz -C ttrl_jax" in remote_command(ssh)
    assert rm == ["rm", "-f", tarball]


def test_setup_needs_repo_or_copy_but_not_both(tmp_path, bash_only_path):
    base = ["--name", "t1", "--zone", "z", "--dry-run"]
    proc = run_script("setup.sh", *base, path=bash_only_path)
    assert proc.returncode != 0 and "--repo" in proc.stderr and "--copy" in proc.stderr
    proc = run_script("setup.sh", *base, "--repo", "u", "--copy", ".", path=bash_only_path)
    assert proc.returncode != 0 and "not both" in proc.stderr
    proc = run_script("setup.sh", *base, "--copy", str(tmp_path), path=bash_only_path)
    assert proc.returncode != 0 and "no pyproject.toml" in proc.stderr


# --- launch.sh ----------------------------------------------------------------------------

LAUNCH_EXTRA = ["ttrl.n_vote=64", "run.note=hello world", "q=it's & $HOME"]


def test_launch(bash_only_path):
    args = ["--name", "t1", "--zone", "z", "--mesh", "2x4", "--config", "configs/x.yaml"]
    args += ["--run-name", "r1", "--env", "A=1 2"]
    (cmd,) = dry_run("launch.sh", *args, "--", *LAUNCH_EXTRA, path=bash_only_path)
    assert cmd[:8] == SSH_ALL_T1
    remote = remote_command(cmd)
    assert '"$HOME/ttrl_runs/r1"' in remote and "worker-$worker.log" in remote
    # The run's command line, split by the worker's shell, keeps every argument whole.
    (nohup_part,) = [part for part in remote.split("; ") if part.startswith("nohup ")]
    words = shlex.split(nohup_part.split(" >")[0])
    assert words == ["nohup", "env", "PYTHONUNBUFFERED=1", "A=1 2", "python3", "-m",
                     "ttrl_jax.run", "--mesh", "2x4", "--config", "configs/x.yaml",
                     *LAUNCH_EXTRA]  # fmt: skip


def test_launch_default_run_name_is_a_timestamp(bash_only_path):
    (cmd,) = dry_run("launch.sh", *VALID_ARGS["launch.sh"], path=bash_only_path)
    assert re.search(r'ttrl_runs/run-\d{8}-\d{6}"', remote_command(cmd))


def test_launch_accepts_auto_mesh(bash_only_path):
    args = ["--name", "t1", "--zone", "z", "--mesh", "auto"]
    (cmd,) = dry_run("launch.sh", *args, path=bash_only_path)
    assert "ttrl_jax.run --mesh auto " in remote_command(cmd)


@pytest.mark.parametrize("mesh", ["8", "2x", "0x4", "2x4x2", "axb"])
def test_launch_rejects_bad_mesh(mesh, bash_only_path):
    proc = run_script("launch.sh", "--name", "t1", "--zone", "z", "--mesh", mesh, "--dry-run",
                      path=bash_only_path)  # fmt: skip
    assert proc.returncode != 0
    assert "--mesh" in proc.stderr


def test_launch_rejects_arguments_before_the_separator(bash_only_path):
    proc = run_script("launch.sh", *VALID_ARGS["launch.sh"], "ttrl.n_vote=64", "--dry-run",
                      path=bash_only_path)  # fmt: skip
    assert proc.returncode != 0
    assert "after --" in proc.stderr


@pytest.fixture
def worker_home(tmp_path):
    """A fake worker: home directory with a code checkout and fake python3/curl/hostname."""
    home = tmp_path / "home"
    (home / "ttrl_jax").mkdir(parents=True)
    bin_dir = tmp_path / "fake_bin"
    bin_dir.mkdir()
    _write_exe(bin_dir / "python3", FAKE_PYTHON)
    return home, bin_dir


def _run_on_fake_worker(remote, home, bin_dir, env_extra):
    env = {k: v for k, v in os.environ.items() if k != "TPU_WORKER_ID"}
    env.update(HOME=str(home), PATH=f"{bin_dir}:{os.environ['PATH']}", **env_extra)
    return subprocess.run(
        [BASH, "-c", remote], capture_output=True, text=True, env=env, cwd=home, timeout=60
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
    worker_home, bash_only_path, env_extra, curl, hostname, worker_id
):
    home, bin_dir = worker_home
    if curl:
        _write_exe(bin_dir / "curl", f"#!/bin/bash\n{curl}\n")
    if hostname:
        _write_exe(bin_dir / "hostname", f"#!/bin/bash\n{hostname}\n")
    args = ["--name", "t1", "--zone", "z", "--mesh", "2x4", "--run-name", "r1"]
    (cmd,) = dry_run("launch.sh", *args, "--", *LAUNCH_EXTRA, path=bash_only_path)
    proc = _run_on_fake_worker(remote_command(cmd), home, bin_dir, env_extra)
    assert proc.returncode == 0, proc.stderr
    assert f"worker {worker_id}: started" in proc.stdout

    run_dir = home / "ttrl_runs" / "r1"
    log = wait_for_text(run_dir / f"worker-{worker_id}.log", "DONE")
    args_seen = re.findall(r"^ARG=(.*)$", log, flags=re.M)
    assert args_seen == ["-m", "ttrl_jax.run", "--mesh", "2x4", *LAUNCH_EXTRA]
    assert f"CWD={home / 'ttrl_jax'}" in log and "UNBUFFERED=1" in log
    assert (run_dir / f"worker-{worker_id}.pid").read_text().strip().isdigit()
    assert os.readlink(home / "ttrl_runs" / "latest") == "r1"


def test_launch_refuses_to_reuse_a_running_run(worker_home, bash_only_path):
    home, bin_dir = worker_home
    run_dir = home / "ttrl_runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "worker-0.pid").write_text(f"{os.getpid()}\n")  # a live process
    args = ["--name", "t1", "--zone", "z", "--mesh", "1x4", "--run-name", "r1"]
    (cmd,) = dry_run("launch.sh", *args, path=bash_only_path)
    proc = _run_on_fake_worker(remote_command(cmd), home, bin_dir, {"TPU_WORKER_ID": "0"})
    assert proc.returncode != 0
    assert "still running" in proc.stderr
    assert not (run_dir / "worker-0.log").exists()


def test_launch_on_a_worker_without_setup_says_so(tmp_path, bash_only_path):
    home = tmp_path / "home"
    home.mkdir()
    (cmd,) = dry_run("launch.sh", *VALID_ARGS["launch.sh"], path=bash_only_path)
    proc = _run_on_fake_worker(remote_command(cmd), home, tmp_path, {"TPU_WORKER_ID": "0"})
    assert proc.returncode != 0
    assert "run setup.sh first" in proc.stderr
    assert not (home / "ttrl_runs").exists()


# --- logs.sh ------------------------------------------------------------------------------


def test_logs_fetch_each_worker(bash_only_path):
    args = ["--name", "t1", "--zone", "z", "--run-name", "r1", "--workers", "2"]
    mkdir, scp0, scp1 = dry_run("logs.sh", *args, path=bash_only_path)
    assert mkdir == ["mkdir", "-p", "tpu_logs/t1/r1"]
    for worker, scp in enumerate([scp0, scp1]):
        assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "t1:ttrl_runs/r1/worker-*.log",
                       "tpu_logs/t1/r1/", f"--worker={worker}", "--zone=z"]  # fmt: skip


def test_logs_fetch_one_worker_of_the_latest_run(bash_only_path):
    args = ["--name", "t1", "--zone", "z", "--worker", "3", "--out", "my logs"]
    mkdir, scp = dry_run("logs.sh", *args, path=bash_only_path)
    assert mkdir == ["mkdir", "-p", "my logs"]
    assert scp[5:8] == ["t1:ttrl_runs/latest/worker-*.log", "my logs/", "--worker=3"]


def test_logs_follow(bash_only_path):
    args = ["--name", "t1", "--zone", "z", "--run-name", "r1", "--follow", "--lines", "20"]
    (cmd,) = dry_run("logs.sh", *args, path=bash_only_path)
    assert cmd[:8] == SSH_ALL_T1
    remote = remote_command(cmd)
    assert '"$HOME/ttrl_runs/r1"' in remote
    assert 'tail -n 20 -F "$1"' in remote and "[worker $w]" in remote


# --- delete.sh ----------------------------------------------------------------------------


def test_delete(bash_only_path):
    (cmd,) = dry_run("delete.sh", *VALID_ARGS["delete.sh"], path=bash_only_path)
    assert cmd == [
        "gcloud", "compute", "tpus", "tpu-vm", "delete", "ttrl-v4", "--zone=us-central2-b",
    ]  # fmt: skip


def test_delete_queued(bash_only_path):
    args = [*VALID_ARGS["delete.sh"], "--queued", "--yes", "--project", "p"]
    (cmd,) = dry_run("delete.sh", *args, path=bash_only_path)
    assert cmd == ["gcloud", "compute", "tpus", "queued-resources", "delete", "ttrl-v4",
                   "--zone=us-central2-b", "--project=p", "--force", "--quiet"]  # fmt: skip


# --- errors -------------------------------------------------------------------------------


def _without(args, option):
    i = args.index(option)
    return args[:i] + args[i + 2 :]


@pytest.mark.parametrize(
    "script, option",
    [
        ("create.sh", "--name"),
        ("create.sh", "--zone"),
        ("create.sh", "--type"),
        ("setup.sh", "--name"),
        ("setup.sh", "--zone"),
        ("launch.sh", "--name"),
        ("launch.sh", "--mesh"),
        ("logs.sh", "--zone"),
        ("delete.sh", "--name"),
        ("delete.sh", "--zone"),
    ],
)
def test_missing_required_argument_is_named(script, option, bash_only_path):
    args = _without(VALID_ARGS[script], option)
    proc = run_script(script, *args, "--dry-run", path=bash_only_path)
    assert proc.returncode != 0
    assert f"missing required argument {option}" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("script", SCRIPTS)
def test_option_without_value_and_unknown_option_fail(script, bash_only_path):
    proc = run_script(script, *VALID_ARGS[script], "--zone", path=bash_only_path)
    assert proc.returncode != 0 and "--zone needs a value" in proc.stderr
    proc = run_script(script, *VALID_ARGS[script], "--bogus", path=bash_only_path)
    assert proc.returncode != 0 and "unknown argument '--bogus'" in proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_without_gcloud_fails_with_fix(script, bash_only_path):
    proc = run_script(script, *VALID_ARGS[script], path=bash_only_path)
    assert proc.returncode != 0
    assert "gcloud not found" in proc.stderr
    assert "Google Cloud SDK" in proc.stderr and "gcloud auth login" in proc.stderr
    assert proc.stdout == ""


# --- end to end, through a fake gcloud ----------------------------------------------------


def test_setup_launch_logs_through_fake_gcloud(tmp_path):
    """Runs setup --copy, launch and logs for real against a fake two-worker TPU."""
    root = tmp_path / "tpu"
    for w in range(2):
        (root / f"worker-{w}").mkdir(parents=True)
    bin_dir = tmp_path / "fake_bin"
    bin_dir.mkdir()
    _write_exe(bin_dir / "gcloud", FAKE_GCLOUD)
    _write_exe(bin_dir / "python3", FAKE_PYTHON)
    checkout = tmp_path / "checkout"
    (checkout / "ttrl_jax").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("[project]\n")
    (checkout / "ttrl_jax" / "run.py").write_text("")
    (checkout / ".git").mkdir()
    path = f"{bin_dir}:{os.environ['PATH']}"
    env = {"FAKE_ROOT": str(root), "FAKE_WORKERS": "2", "TMPDIR": str(tmp_path)}
    common = ["--name", "t1", "--zone", "z"]

    proc = run_script("setup.sh", *common, "--copy", str(checkout), path=path, env_extra=env)
    assert proc.returncode == 0, proc.stderr
    for w in range(2):
        code = root / f"worker-{w}" / "ttrl_jax"
        assert (code / "pyproject.toml").exists() and (code / "ttrl_jax" / "run.py").exists()
        assert not (code / ".git").exists()
        assert "-m pip install -e .[tpu]" in (root / f"worker-{w}" / "pip.log").read_text()
    assert not list(tmp_path.glob("ttrl_jax-src-*.tar.gz")), "local tarball left behind"

    proc = run_script("launch.sh", *common, "--mesh", "2x4", "--run-name", "r1", "--",
                      "a=b c", path=path, env_extra=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for w in range(2):
        log = wait_for_text(root / f"worker-{w}" / "ttrl_runs" / "r1" / f"worker-{w}.log", "DONE")
        assert "ARG=a=b c" in log

    out = tmp_path / "fetched"
    proc = run_script("logs.sh", *common, "--out", str(out), path=path, env_extra=env)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["worker-0.log", "worker-1.log"]
    assert "ARG=--mesh" in (out / "worker-1.log").read_text()
    assert "tpu-vm describe t1" in (root / "gcloud.log").read_text()


def _git(cwd, *args):
    """Runs git with a fixed identity; returns its stdout."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    proc = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_setup_repo_clones_then_follows_the_branch(tmp_path):
    """setup --repo checks out a tag, then a branch, and picks up a new commit on re-run."""
    root = tmp_path / "tpu"
    (root / "worker-0").mkdir(parents=True)
    bin_dir = tmp_path / "fake_bin"
    bin_dir.mkdir()
    _write_exe(bin_dir / "gcloud", FAKE_GCLOUD)
    _write_exe(bin_dir / "python3", FAKE_PYTHON)
    origin = tmp_path / "origin"
    origin.mkdir()
    _git(origin, "init", "-q", "-b", "main")
    (origin / "pyproject.toml").write_text("v1\n")
    _git(origin, "add", ".")
    _git(origin, "commit", "-q", "-m", "one")
    _git(origin, "tag", "v1")
    path = f"{bin_dir}:{os.environ['PATH']}"
    env = {"FAKE_ROOT": str(root), "FAKE_WORKERS": "1"}
    code = root / "worker-0" / "ttrl_jax"

    def setup(ref):
        args = ["--name", "t1", "--zone", "z", "--repo", origin.as_uri(), "--ref", ref]
        proc = run_script("setup.sh", *args, path=path, env_extra=env)
        assert proc.returncode == 0, proc.stderr

    setup("v1")
    assert (code / "pyproject.toml").read_text() == "v1\n"
    (origin / "pyproject.toml").write_text("v2\n")
    _git(origin, "commit", "-q", "-am", "two")
    setup("main")
    assert (code / "pyproject.toml").read_text() == "v2\n"
    assert _git(code, "rev-parse", "HEAD") == _git(origin, "rev-parse", "main")
    setup("v1")
    assert (code / "pyproject.toml").read_text() == "v1\n"


# --- docs and lint ------------------------------------------------------------------------


def test_readme_dry_run_examples_match_the_scripts(bash_only_path):
    readme = (SCRIPTS_DIR / "README.md").read_text()
    examples = [
        ["--name", "ttrl-v4", "--zone", "us-central2-b", "--type", "v4-8"],
        ["--name", "ttrl-v5e", "--zone", "us-west4-a", "--type", "v5litepod-16", "--spot",
         "--queued"],
    ]  # fmt: skip
    for args in examples:
        proc = run_script("create.sh", *args, "--dry-run", path=bash_only_path)
        assert proc.stdout.strip() in readme.splitlines()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean():
    files = sorted(str(p) for p in SCRIPTS_DIR.glob("*.sh"))
    proc = subprocess.run(
        ["shellcheck", "-x", *files], capture_output=True, text=True, cwd=SCRIPTS_DIR
    )
    assert proc.returncode == 0, proc.stdout
