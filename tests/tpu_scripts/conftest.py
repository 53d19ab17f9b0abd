"""Shared by the tests of tpu_scripts/: running a script, its dry-run commands, a fake TPU."""

import os
import shlex
import shutil
import subprocess
import time
import types
from pathlib import Path

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "tpu_scripts"

BASH = shutil.which("bash")

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


@pytest.fixture(scope="session")
def scripts():
    """The scripts' runner and their fakes: run, dry_run, remote_command, wait_for_text,
    write_exe, and SCRIPTS_DIR, BASH, SSH_ALL_T1, VALID_ARGS, FAKE_PYTHON, FAKE_GCLOUD."""
    return types.SimpleNamespace(
        run=run_script, dry_run=dry_run, remote_command=remote_command,
        wait_for_text=wait_for_text, write_exe=_write_exe, SCRIPTS_DIR=SCRIPTS_DIR, BASH=BASH,
        SSH_ALL_T1=SSH_ALL_T1, VALID_ARGS=VALID_ARGS, FAKE_PYTHON=FAKE_PYTHON,
        FAKE_GCLOUD=FAKE_GCLOUD,
    )  # fmt: skip
