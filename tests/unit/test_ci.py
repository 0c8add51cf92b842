"""`.ci/run` is the README's test command, and the checks it runs are declared and configured."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def readme_test_command() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## The two commands") : readme.index("## Running it")]
    blocks = re.findall(r"```sh\n(.*?)\n```", section, re.DOTALL)
    return next(block for block in blocks if "pytest" in block)


def test_ci_runs_exactly_the_readme_test_command() -> None:
    script = (REPO / ".ci" / "run").read_text().rstrip("\n").splitlines()
    assert script[-1] == readme_test_command()


def test_each_check_before_the_tests_is_declared_configured_and_named_in_the_readme() -> None:
    steps = readme_test_command().split(" && ")
    checks = steps[steps.index("python3 -m venv .venv") + 2 : -1]
    assert checks == [
        ".venv/bin/ruff check",
        ".venv/bin/ruff format --check",
        ".venv/bin/mypy",
        ".venv/bin/lint-imports",
    ]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    declared = {
        re.split(r"[<>=\[ ;]", requirement)[0] for requirement in pyproject["project"]["optional-dependencies"]["test"]
    }
    assert {"ruff", "mypy", "import-linter"} <= declared
    assert {"ruff", "mypy", "importlinter"} <= set(pyproject["tool"])
    readme = (REPO / "README.md").read_text()
    note = " ".join(readme[readme.index("`.ci/run` runs exactly this command") :].split("\n\n")[0].split())
    for check in checks:
        assert f"`{check.removeprefix('.venv/bin/')}`" in note
