"""The demo corpus's downloads (``cptrain.demo.packages``): the licence read from a Debian
copyright file."""

from __future__ import annotations

from pathlib import Path

from cptrain.demo import packages as dp


def test_read_license(tmp_path: Path) -> None:
    dep5 = tmp_path / "dep5"
    dep5.write_text("Format: https://x\n\nFiles: *\nLicense: GPL-2+\n\nFiles: a\n"
                    "License: MPL-2.0\n text\n\nLicense: GPL-2+\n full text\n")
    assert dp.read_license(dep5) == "GPL-2+; MPL-2.0"
    free = tmp_path / "free"
    free.write_text("Debianized by someone.\n\nThese pages use several\nlicenses.\n")
    assert dp.read_license(free) == "These pages use several licenses."
    assert dp.read_license(tmp_path / "missing").startswith("unknown")
