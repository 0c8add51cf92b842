"""`.ci/run` is the README's test command, and the checks it runs are declared and configured."""

from __future__ import annotations

import ast
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


def test_every_test_that_builds_the_wheel_is_marked_package_and_the_default_run_includes_it() -> None:
    # `-m "not package"` (README) must skip every wheel build, and only a marker declared in
    # pyproject passes --strict-markers; CI runs plain `pytest`, so nothing may deselect them.
    builds = re.compile(r"""["'](wheel|bdist_wheel|sdist)["']|-m["'], ["']build["']""")
    tests = [path for path in (REPO / "tests").rglob("test_*.py") if path.resolve() != Path(__file__).resolve()]
    building = [path for path in tests if builds.search(path.read_text())]
    assert building, "no test builds the wheel: the pattern above no longer finds them"
    for path in building:
        tree = ast.parse(path.read_text())
        if "pytest.mark.package" in {ast.unparse(node.value) for node in tree.body if isinstance(node, ast.Assign)}:
            continue  # the whole module is marked
        unmarked = [
            node.name
            for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.name.startswith("test_")
            and "pytest.mark.package" not in {ast.unparse(d) for d in node.decorator_list}
        ]
        assert not unmarked, f"{path.relative_to(REPO)} builds the wheel; not marked package: {unmarked}"
    pytest_config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--strict-markers" in pytest_config["addopts"] and "-m" not in pytest_config["addopts"].split()
    assert any(marker.startswith("package:") for marker in pytest_config["markers"])
    assert readme_test_command().endswith(" -m pytest")  # no -m "..." marker filter after it
