"""tpu_scripts/ as a whole (common.sh): help, argument errors, no gcloud, the README's
dry-run examples, shellcheck, and setup, launch and logs end to end through a fake gcloud."""

import shutil
import subprocess

import pytest

SCRIPTS = ["create.sh", "setup.sh", "launch.sh", "logs.sh", "delete.sh"]


HELP_OPTIONS = {
    "create.sh": ["--name", "--zone", "--type", "--version", "--spot", "--queued", "--project"],
    "setup.sh": ["--name", "--zone", "--repo", "--ref", "--copy", "--dir", "--python"],
    "launch.sh": ["--name", "--zone", "--mesh", "--config", "--run-name", "--env", "--dir"],
    "logs.sh": ["--name", "--zone", "--run-name", "--worker", "--follow", "--lines", "--out"],
    "delete.sh": ["--name", "--zone", "--queued", "--yes", "--project"],
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_usage_options_and_example(scripts, script, bash_only_path):
    proc = scripts.run(script, "--help", path=bash_only_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage:")
    for option in [*HELP_OPTIONS[script], "--dry-run", "--help"]:
        assert option in proc.stdout, f"{script} --help does not mention {option}"
    assert "Example:" in proc.stdout


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
def test_missing_required_argument_is_named(scripts, script, option, bash_only_path):
    args = _without(scripts.VALID_ARGS[script], option)
    proc = scripts.run(script, *args, "--dry-run", path=bash_only_path)
    assert proc.returncode != 0
    assert f"missing required argument {option}" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("script", SCRIPTS)
def test_option_without_value_and_unknown_option_fail(scripts, script, bash_only_path):
    proc = scripts.run(script, *scripts.VALID_ARGS[script], "--zone", path=bash_only_path)
    assert proc.returncode != 0 and "--zone needs a value" in proc.stderr
    proc = scripts.run(script, *scripts.VALID_ARGS[script], "--bogus", path=bash_only_path)
    assert proc.returncode != 0 and "unknown argument '--bogus'" in proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_without_gcloud_fails_with_fix(scripts, script, bash_only_path):
    proc = scripts.run(script, *scripts.VALID_ARGS[script], path=bash_only_path)
    assert proc.returncode != 0
    assert "gcloud not found" in proc.stderr
    assert "Google Cloud SDK" in proc.stderr and "gcloud auth login" in proc.stderr
    assert proc.stdout == ""


def test_readme_dry_run_examples_match_the_scripts(scripts, bash_only_path):
    readme = (scripts.SCRIPTS_DIR / "README.md").read_text()
    examples = [
        ["--name", "ttrl-v4", "--zone", "us-central2-b", "--type", "v4-8"],
        ["--name", "ttrl-v5e", "--zone", "us-west4-a", "--type", "v5litepod-16", "--spot",
         "--queued"],
    ]  # fmt: skip
    for args in examples:
        proc = scripts.run("create.sh", *args, "--dry-run", path=bash_only_path)
        assert proc.stdout.strip() in readme.splitlines()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean(scripts):
    files = sorted(str(p) for p in scripts.SCRIPTS_DIR.glob("*.sh"))
    proc = subprocess.run(
        ["shellcheck", "-x", *files], capture_output=True, text=True, cwd=scripts.SCRIPTS_DIR
    )
    assert proc.returncode == 0, proc.stdout
