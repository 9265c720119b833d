"""What a built demo-corpus language directory holds, and how it is checked: the documents
split train/val by a hash of their key, each split written as JSONL, and ``manifest.json``
recording the build settings, sources and the splits' sha256.

One module for writing and reading that layout, so the build and the up-to-date check
(`language_problem`, behind `demo_corpus_ready`) cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cptrain import fsutil
from cptrain.demo.sources import PACKAGED

FORMAT = "cptrain-demo-corpus/1"
MIN_VAL_BYTES = 60 * 1024
SPLITS = ("train", "val")
EVAL_ONLY_SPLITS = ("val",)

# --- documents and the train/val split ---------------------------------------------------------


@dataclass
class Document:
    doc_id: str
    source: str
    paragraphs: list[str]

    @property
    def text(self) -> str:
        return "\n\n".join(self.paragraphs)


def split_position(doc_id: str) -> float:
    """A uniform number in [0, 1) fixed by the document key alone (so by no language)."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(
    docs: Sequence[Document], val_fraction: float, min_val_bytes: int = MIN_VAL_BYTES
) -> tuple[list[Document], list[Document]]:
    """Val = documents whose key hashes under ``val_fraction``; topped up in hash order until
    it holds ``min_val_bytes`` of text (always leaving at least one training document)."""
    ranked = sorted(docs, key=lambda d: (split_position(d.doc_id), d.doc_id))
    n_val = sum(1 for d in ranked if split_position(d.doc_id) < val_fraction)
    val_bytes = sum(len(d.text.encode("utf-8")) for d in ranked[:n_val])
    while val_bytes < min_val_bytes and n_val < len(ranked) - 1:
        val_bytes += len(ranked[n_val].text.encode("utf-8"))
        n_val += 1
    val_ids = {d.doc_id for d in ranked[:n_val]}
    return [d for d in docs if d.doc_id not in val_ids], [d for d in docs if d.doc_id in val_ids]


# --- atomic files and manifests ---------------------------------------------------------------


# Written through the umask (0o666 & ~umask), like any plain open(): a private 0600 temp file
# would hide the corpus from others.
_CORPUS_FILE_MODE = 0o666


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_split(path: Path, docs: Sequence[Document]) -> dict[str, Any]:
    digest = hashlib.sha256()
    with fsutil.atomic_writer(path, _CORPUS_FILE_MODE) as fh:
        for doc in docs:
            record = {"text": doc.text, "doc_id": doc.doc_id, "source": doc.source}
            line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
            digest.update(line)
            fh.write(line)
    return {
        "file": path.name,
        "documents": len(docs),
        "paragraphs": sum(len(d.paragraphs) for d in docs),
        "bytes": sum(len(d.text.encode("utf-8")) for d in docs),
        "file_bytes": path.stat().st_size,
        "sha256": digest.hexdigest(),
    }


def write_manifest(lang_dir: Path, manifest: dict[str, Any]) -> None:
    """``lang_dir/manifest.json``, written last: its presence marks a complete build."""
    with fsutil.atomic_writer(lang_dir / "manifest.json", _CORPUS_FILE_MODE) as fh:
        fh.write((json.dumps(manifest, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))


def read_manifest(lang_dir: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((lang_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def language_splits(language: str) -> tuple[str, ...]:
    """The splits a language's directory holds: val alone for the evaluation-only corpora."""
    return EVAL_ONLY_SPLITS if language in PACKAGED else SPLITS


def language_problem(lang_dir: Path, settings: dict[str, Any] | None = None) -> str | None:
    """Why ``lang_dir`` is not a complete, unmodified build with ``settings`` (None if it is)."""
    manifest = read_manifest(lang_dir)
    if manifest is None:
        return "not built yet"
    if manifest.get("format") != FORMAT:
        return f"built with format {manifest.get('format')!r}, this version writes {FORMAT!r}"
    for key, value in (settings or {}).items():
        if manifest.get(key) != value:
            return f"built with {key}={manifest.get(key)!r}, asked for {value!r}"
    splits = manifest.get("splits")
    for split in language_splits(Path(lang_dir).name):
        info = splits.get(split) if isinstance(splits, dict) else None
        if not isinstance(info, dict):
            return f"its manifest lacks the {split} split"
        path = lang_dir / f"{split}.jsonl"
        if not path.is_file():
            return f"{path.name} is missing"
        if path.stat().st_size != info.get("file_bytes") or file_sha256(path) != info.get(
            "sha256"
        ):
            return f"{path.name} does not match the sha256 in its manifest"
    return None
