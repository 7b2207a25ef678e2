"""The dependency direction of STYLE.md: stages do not import each other, and the layers below never import a stage.

`cli` and `jobs` chain stages (they launch the pipeline), so they may import any of them."""

from __future__ import annotations

import ast
from pathlib import Path

import tunesmith

PACKAGE = Path(tunesmith.__file__).parent
STAGES = {"train", "evaluate", "serve", "monitor"}
LAUNCHERS = {"cli", "jobs"}
LOWER = {"data", "registry", "generation"}


def imported_packages(path: Path) -> set[str]:
    """The tunesmith subpackages a file imports (module level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name.split(".")[1] for name in names if name.startswith("tunesmith.") and name.count(".") >= 1}


def test_stages_import_no_other_stage_and_lower_layers_no_stage():
    crossings = []
    for package in sorted(STAGES | LOWER):
        forbidden = (STAGES | LAUNCHERS) - {package}
        for path in sorted((PACKAGE / package).rglob("*.py")):
            for target in sorted(imported_packages(path) & forbidden):
                crossings.append(f"{path.relative_to(PACKAGE)} imports tunesmith.{target}")
    assert crossings == [], "stages talk through files, not imports:\n" + "\n".join(crossings)


def test_the_check_sees_a_crossing(tmp_path):
    offender = tmp_path / "offender.py"
    offender.write_text("def f():\n    from tunesmith.evaluate.metrics import token_f1\n", encoding="utf-8")
    assert imported_packages(offender) == {"evaluate"}
