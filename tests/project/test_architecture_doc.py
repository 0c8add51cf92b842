"""docs/ARCHITECTURE.md is the picture of the code: it names every module, and its layers are
the ones import-linter enforces."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).parents[2]
DOC = (REPO / "docs" / "ARCHITECTURE.md").read_text()


def modules_on_disk() -> set[str]:
    return {
        p.relative_to(REPO).as_posix()
        for p in (REPO / "proxy").rglob("*.py")
        if p.name != "__init__.py" or p.parent.name == "proxy"
    }


def test_the_document_names_every_module_and_no_other() -> None:
    named = set(re.findall(r"`(proxy/[\w/]+\.py)`", DOC))
    assert modules_on_disk() - named == set(), "modules the document does not name"
    assert named - modules_on_disk() == set(), "the document names modules that do not exist"


def test_the_layer_table_is_the_import_contracts_order() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in config if c["type"] == "layers")["layers"]
    wings = [layer.removeprefix("proxy.") for layer in layers if layer != "proxy.__main__"]
    table = DOC.split("## Layers", 1)[1].split("## ", 1)[0]
    assert re.findall(r"^\| `(\w+)/` \|", table, re.M) == wings
    on_disk = sorted(p.name for p in (REPO / "proxy").iterdir() if (p / "__init__.py").exists())
    assert sorted(wings) == on_disk
