"""The README's two commands stay runnable, and CI runs the README's test command.

``.ci/run`` spells the test command out one step a line (with ``-q`` on pip, a report of the
machine in between); every step of the README's command must be one of its lines, in the same
order, so that the README never advertises a check CI does not run, or an install CI does not do.
"""

from __future__ import annotations

import re
import shlex
import subprocess

from helpers import REPO


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def _command(heading: str) -> str:
    """The first bash block after the README paragraph that starts with ``heading``."""
    readme = (REPO / "README.md").read_text()
    start = readme.index(heading)
    return _bash_blocks(readme[start:])[0]


def _steps(command: str) -> list[str]:
    """A ``&&`` chain (continued with backslashes) as its steps, each normalised by shlex."""
    joined = command.replace("\\\n", " ")
    return [shlex.join(shlex.split(step)) for step in joined.split("&&") if step.strip()]


DEMO = "Run the demo"
TESTS = "Run the checks and the tests"


def test_readme_commands_are_valid_bash():
    for heading in (DEMO, TESTS):
        command = _command(heading)
        proc = subprocess.run(["bash", "-n"], input=command, text=True, capture_output=True)
        assert proc.returncode == 0, (heading, proc.stderr)
        assert len(_steps(command)) >= 4, command


def test_ci_runs_the_readme_test_command():
    steps = _steps(_command(TESTS))
    assert steps[:2] == ["python3 -m venv .venv", ". .venv/bin/activate"], steps
    ci_lines = []
    for line in (REPO / ".ci" / "run").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            try:
                words = shlex.split(line)
                quiet = words[:1] == ["pip"]  # CI's pip runs quietly; the step is the same
                ci_lines.append(shlex.join(w for w in words if not (quiet and w == "-q")))
            except ValueError:  # the heredoc's Python, not a step
                continue
    positions = []
    for step in steps[2:]:
        assert step in ci_lines, f"README test command step not run by .ci/run: {step}"
        positions.append(ci_lines.index(step))
    assert positions == sorted(positions), f".ci/run runs the README's steps in another order: {steps[2:]}"
    assert "mkdocs build --strict" in steps and "python -m pytest -q -ra" in steps
