"""`cptrain train` under an audit hook that records every file this rank opens for writing
under the run's replay directory (one JSON list per rank in $AUDIT_DIR)."""

import json
import os
import sys
from pathlib import Path

from cptrain.cli import main

written: set[str] = set()
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def hook(event: str, args: tuple) -> None:
    if event != "open" or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path = os.fsdecode(args[0])
    mode, flags = args[1], args[2]
    writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
        isinstance(flags, int) and flags & WRITE_FLAGS
    )
    if writing and "/replay/" in path:
        written.add(os.path.realpath(path))


sys.addaudithook(hook)
code = main(sys.argv[1:])
out = Path(os.environ["AUDIT_DIR"]) / f"rank_{os.environ.get('RANK', '0')}.json"
out.write_text(json.dumps(sorted(written)))
sys.exit(code)
