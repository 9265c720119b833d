"""The code's shape, as the redesign of the trainer left it: one loop under 400 lines with short
functions, and one module that renames files into place and fsyncs."""

import ast
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
