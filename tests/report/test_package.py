"""The report package's shape: torch-free, layered without import cycles, modules of one job
(none over 500 lines). Its one renderer is tested in test_blocks.py."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import cptrain.report

PACKAGE = Path(cptrain.report.__file__).parent
MODULES = sorted(PACKAGE.glob("*.py"))


def test_reports_and_cards_import_neither_torch_nor_training_nor_checkpoints():
    # A fresh interpreter: this one may have imported torch for other tests.
    code = ("import sys, cptrain.report.document, cptrain.report.model_card; "
            "print([m for m in sys.modules "
            "if m.startswith(('torch', 'cptrain.train', 'cptrain.checkpoint'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_no_module_is_over_500_lines():
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in MODULES}
    assert {name: n for name, n in sizes.items() if n > 500} == {}


def _imports(path: Path) -> tuple[list[ast.ImportFrom], list[ast.AST]]:
    """(every ``from cptrain.report… import``, the imports inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    report = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
              and (n.module or "").startswith("cptrain.report")]
    nested = [n for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
              for n in ast.walk(f) if isinstance(n, ast.Import | ast.ImportFrom)]
    return report, nested


def test_modules_import_only_public_names_of_their_siblings_and_at_the_top():
    for path in MODULES:
        report, nested = _imports(path)
        private = [a.name for n in report for a in n.names if a.name.startswith("_")]
        assert private == [], path.name
        # a function-level import of a sibling would hide a cycle
        hidden = [n for n in nested if isinstance(n, ast.ImportFrom)
                  and (n.module or "").startswith("cptrain.report")]
        assert hidden == [], path.name


def test_the_sibling_imports_have_no_cycle():
    edges = {}
    for path in MODULES:
        report, _ = _imports(path)
        targets = {n.module.rsplit(".", 1)[-1] for n in report if n.module != "cptrain.report"}
        targets |= {a.name for n in report if n.module == "cptrain.report" for a in n.names}
        edges[path.stem] = targets - {path.stem}

    def visit(node: str, trail: tuple[str, ...]) -> None:
        assert node not in trail, " → ".join((*trail, node))
        for nxt in edges.get(node, ()):
            visit(nxt, (*trail, node))

    for name in edges:
        visit(name, ())
