"""Project-level promises: the README's commands are what CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands():
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_run_and_test_commands():
    run_cmd, test_cmd = readme_commands()
    assert run_cmd.endswith("python -m ttrl_jax.run")
    assert "pytest" in test_cmd


def test_ci_runs_the_readme_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci_lines


def test_ci_runs_the_readme_first_command_in_a_fresh_environment():
    """The first command is proven where the test extras are not installed."""
    ci = (ROOT / ".ci" / "run").read_text()
    run_cmd = readme_commands()[0]
    install, _, program = run_cmd.partition(" && ")
    assert install == "pip install -e ."
    assert 'python -m venv "$fresh/venv"' in ci
    assert '"$fresh/venv/bin/pip" install -q -e .\n' in ci
    python, _, module = program.partition(" ")
    assert f'"$fresh/venv/bin/{python}" {module}' in ci
