"""tpu_scripts/setup.sh: installing on every worker from a repository or a copy."""

import os
import shutil
import subprocess

import pytest


def test_setup_repo(scripts, bash_only_path):
    args = ["--name", "t1", "--zone", "z", "--repo", "https://github.com/o/ttrl_jax.git"]
    (cmd,) = scripts.dry_run("setup.sh", *args, "--ref", "v0.1", path=bash_only_path)
    assert cmd[:8] == scripts.SSH_ALL_T1
    remote = scripts.remote_command(cmd)
    assert "git clone https://github.com/o/ttrl_jax.git ttrl_jax" in remote
    assert "checkout --detach origin/v0.1" in remote
    assert 'python3 -m pip install -e ".[tpu]"' in remote


def test_setup_copy(scripts, tmp_path, bash_only_path):
    checkout = tmp_path / "my checkout"
    checkout.mkdir()
    (checkout / "pyproject.toml").write_text("")
    tar, scp, ssh, rm = scripts.dry_run("setup.sh", "--name", "t1", "--zone", "z", "--copy",
                                str(checkout), path=bash_only_path)  # fmt: skip
    tarball = tar[tar.index("-czf") + 1]
    assert tar[0] == "tar" and tar[-3:] == ["-C", str(checkout), "."]
    assert "--exclude=.git" in tar
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball,
                   "t1:ttrl_jax-src.tar.gz", "--worker=all", "--zone=z"]  # fmt: skip
    assert ssh[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t1", "--worker=all"]
    assert "tar -xzf ttrl_jax-src.tar.gz -C ttrl_jax" in scripts.remote_command(ssh)
    assert rm == ["rm", "-f", tarball]


def test_setup_needs_repo_or_copy_but_not_both(scripts, tmp_path, bash_only_path):
    base = ["--name", "t1", "--zone", "z", "--dry-run"]
    proc = scripts.run("setup.sh", *base, path=bash_only_path)
    assert proc.returncode != 0 and "--repo" in proc.stderr and "--copy" in proc.stderr
    proc = scripts.run("setup.sh", *base, "--repo", "u", "--copy", ".", path=bash_only_path)
    assert proc.returncode != 0 and "not both" in proc.stderr
    proc = scripts.run("setup.sh", *base, "--copy", str(tmp_path), path=bash_only_path)
    assert proc.returncode != 0 and "no pyproject.toml" in proc.stderr


def test_setup_launch_logs_through_fake_gcloud(scripts, tmp_path):
    """Runs setup --copy, launch and logs for real against a fake two-worker TPU."""
    root = tmp_path / "tpu"
    for w in range(2):
        (root / f"worker-{w}").mkdir(parents=True)
    bin_dir = tmp_path / "fake_bin"
    bin_dir.mkdir()
    scripts.write_exe(bin_dir / "gcloud", scripts.FAKE_GCLOUD)
    scripts.write_exe(bin_dir / "python3", scripts.FAKE_PYTHON)
    checkout = tmp_path / "checkout"
    (checkout / "ttrl_jax").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("[project]\n")
    (checkout / "ttrl_jax" / "run.py").write_text("")
    (checkout / ".git").mkdir()
    path = f"{bin_dir}:{os.environ['PATH']}"
    env = {"FAKE_ROOT": str(root), "FAKE_WORKERS": "2", "TMPDIR": str(tmp_path)}
    common = ["--name", "t1", "--zone", "z"]

    proc = scripts.run("setup.sh", *common, "--copy", str(checkout), path=path, env_extra=env)
    assert proc.returncode == 0, proc.stderr
    for w in range(2):
        code = root / f"worker-{w}" / "ttrl_jax"
        assert (code / "pyproject.toml").exists() and (code / "ttrl_jax" / "run.py").exists()
        assert not (code / ".git").exists()
        assert "-m pip install -e .[tpu]" in (root / f"worker-{w}" / "pip.log").read_text()
    assert not list(tmp_path.glob("ttrl_jax-src-*.tar.gz")), "local tarball left behind"

    proc = scripts.run("launch.sh", *common, "--mesh", "2x4", "--run-name", "r1", "--",
                      "a=b c", path=path, env_extra=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for w in range(2):
        log = scripts.wait_for_text(
            root / f"worker-{w}" / "ttrl_runs" / "r1" / f"worker-{w}.log", "DONE"
        )
        assert "ARG=a=b c" in log

    out = tmp_path / "fetched"
    proc = scripts.run("logs.sh", *common, "--out", str(out), path=path, env_extra=env)
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
def test_setup_repo_clones_then_follows_the_branch(scripts, tmp_path):
    """setup --repo checks out a tag, then a branch, and picks up a new commit on re-run."""
    root = tmp_path / "tpu"
    (root / "worker-0").mkdir(parents=True)
    bin_dir = tmp_path / "fake_bin"
    bin_dir.mkdir()
    scripts.write_exe(bin_dir / "gcloud", scripts.FAKE_GCLOUD)
    scripts.write_exe(bin_dir / "python3", scripts.FAKE_PYTHON)
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
        proc = scripts.run("setup.sh", *args, path=path, env_extra=env)
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
