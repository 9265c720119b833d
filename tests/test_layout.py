"""The code's shape, as the redesign of the trainer left it: one loop under 400 lines with short
functions, and one module that renames files into place and fsyncs."""

import ast
import logging
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "cptrain"


def test_the_training_loop_stays_small():
    path = SRC / "train" / "trainer.py"
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 400
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= 60, f"{node.name} has {length} lines"


def test_only_fsutil_renames_into_place_and_fsyncs():
    pattern = re.compile(r"\bos\.(replace|rename|fsync)\(|\.rename\(")
    offenders = [
        f"{p.relative_to(SRC)}:{i}"
        for p in SRC.rglob("*.py")
        if p.name != "fsutil.py"
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_import_contracts_hold(tmp_path, capsys):
    """pyproject.toml's import-linter contracts: the layers, report/ free of torch, train/ and
    checkpoint/, torch-free configs and run directory, no cycle inside any package."""
    from importlinter.cli import lint_imports

    pyproject = SRC.parents[1] / "pyproject.toml"
    # import-linter configures logging with dictConfig, which disables every existing logger:
    # later tests in this process would capture none of cptrain's warnings
    loggers = [lg for lg in logging.root.manager.loggerDict.values()
               if isinstance(lg, logging.Logger)]
    was = [lg.disabled for lg in loggers]
    try:
        code = lint_imports(config_filename=str(pyproject), cache_dir=str(tmp_path),
                            no_logo=True)
    finally:
        for lg, disabled in zip(loggers, was, strict=True):
            lg.disabled = disabled
    assert code == 0, capsys.readouterr().out


def test_the_top_level_holds_few_modules_beside_the_packages():
    loose = sorted(p.name for p in SRC.glob("*.py"))
    assert len(loose) <= 12, loose


def test_no_module_over_600_lines_and_no_class_over_400():
    long_modules, long_classes = [], []
    for path in SRC.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > 600:
            long_modules.append(str(path.relative_to(SRC)))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 400:
                long_classes.append(f"{path.relative_to(SRC)}:{node.name}")
    assert long_modules == [] and long_classes == []
