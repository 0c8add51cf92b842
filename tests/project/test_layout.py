"""The package's wings (README: "Layout of the code") against the tree and the import contracts
in pyproject.toml, so the three cannot drift: a module the README does not place, a wing the
contracts do not order, or an import across the layers fails here."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).parents[2]


def readme_wings() -> list[tuple[str, set[str]]]:
    """(wing, its modules), top wing first, from the README's table."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Layout of the code\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)/` \| ([^|]+) \|", section, flags=re.M)
    return [(wing, set(re.findall(r"`(\w+)`", modules))) for wing, modules in rows]


def contracts() -> list[dict[str, object]]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_the_readme_places_every_module_in_its_wing() -> None:
    wings = readme_wings()
    assert len(wings) == 8
    on_disk = {
        path.name: {p.stem for p in path.glob("*.py") if p.name != "__init__.py"}
        for path in (REPO / "proxy").iterdir()
        if (path / "__init__.py").exists()
    }
    assert dict(wings) == on_disk
    loose = {p.name for p in (REPO / "proxy").glob("*.py")}
    assert loose == {"__init__.py", "__main__.py"}, "a module outside every wing"


def test_the_layers_contract_orders_the_wings_as_the_readme_does() -> None:
    [layers] = [c for c in contracts() if c["type"] == "layers"]
    assert layers["layers"] == ["proxy.__main__", *(f"proxy.{wing}" for wing, _ in readme_wings())]


def test_the_http_layer_may_import_no_other_wing() -> None:
    [forbidden] = [c for c in contracts() if c["type"] == "forbidden"]
    assert forbidden["source_modules"] == ["proxy.http"]
    others = {f"proxy.{wing}" for wing, _ in readme_wings()} - {"proxy.http"}
    assert set(forbidden["forbidden_modules"]) == others | {"proxy.__main__"}


def test_the_import_contracts_hold() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_unit_tests_mirror_the_wings() -> None:
    """Every test of `tests/unit/` sits in a folder named for the wing it tests."""
    wings = {wing for wing, _ in readme_wings()}
    unit = REPO / "tests" / "unit"
    loose = sorted(p.name for p in unit.glob("test_*.py"))
    assert not loose, f"tests/unit/ holds tests outside every wing's folder: {loose}"
    folders = {p.name for p in unit.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders <= wings, f"folders of tests/unit/ that are no wing: {sorted(folders - wings)}"
    assert {"http", "base", "config", "auth", "telemetry", "request", "tools"} <= folders
    for folder in folders:
        assert (unit / folder / "__init__.py").exists(), f"tests/unit/{folder}/ is not a package"
