"""Per-source extractors of the demo corpus (``cptrain.demo.sources``): HTML, XHTML and Mallard
to text, man pages rendered with groff, the en-wiki summaries file, and the languages there are."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from cptrain.demo import manifest as dm
from cptrain.demo import sources as ds
from demo.test_corpus import EN_SENTENCE, _man_page, needs_debian_tools


def test_html_to_text_drops_hidden_parts_and_keeps_inline_code() -> None:
    html = """<html><head><title>T</title><style>p{}</style></head><body>
    <header>Site menu</header><nav>Home Next</nav>
    <div class="toc">1. Chapter</div>
    <p>Run <code>apt-get update</code>\n\n  first &amp; wait.</p>
    <script>var x = "secret";</script><pre>shell session</pre>
    <p>Press <span class="switchinline"><span hidden="true" id="MACx" class="MAC">Command
    </span><span hidden="true" id="defaultx">Ctrl</span></span>+O<br>to open.</p>
    <ul><li>one</li><li>two <img src="a.png"> items</li></ul>
    <footer>debug info</footer></body></html>"""
    assert ds.html_to_text(html) == (
        "Run apt-get update first & wait.\n\nPress Ctrl+O\n\nto open.\n\none\n\ntwo items"
    )


def test_xhtml_self_closing_tags_do_not_start_skips() -> None:
    html = '<div><a id="x"/><p>Kept text.</p><hr/><p hidden="hidden"/>After.</div>'
    assert ds.html_to_text(html) == "Kept text.\n\nAfter."


def test_mallard_to_text_drops_info_and_screen() -> None:
    page = """<?xml version="1.0"?><page xmlns="http://projectmallard.org/1.0/" id="x">
    <info><credit><name>Author Name</name></credit><desc>Summary</desc></info>
    <title>Zoom in</title><p>Use the <gui>Zoom</gui> switch.</p>
    <screen>$ gsettings set</screen><list><item><p>First step.</p></item></list></page>"""
    assert ds.mallard_to_text(page) == "Zoom in\n\nUse the Zoom switch.\n\nFirst step."


@needs_debian_tools
def test_man_page_rendering_splits_headings_and_skips_aliases(tmp_path: Path) -> None:
    page = tmp_path / "foo.1.gz"
    page.write_bytes(_man_page("foo", [EN_SENTENCE, "Second paragraph."]))
    text = ds.render_man(str(page))
    assert text.split("\n\n") == ["NAME", "foo - tool", "DESCRIPTION", EN_SENTENCE,
                                  "Second paragraph."]
    alias = tmp_path / "bar.1.gz"
    alias.write_bytes(gzip.compress(b".so man1/foo.1\n"))
    assert ds.render_man(str(alias)) == ""


def test_wiki_summaries_reads_extracts_and_rejects_other_shapes() -> None:
    raw = json.dumps({"B": {"title": "B", "extract": "one\n\n two \nthree"},
                      "A": {"extract": "x"}}).encode()
    assert ds.wiki_summaries(raw) == [("A", "x"), ("B", "one\n\ntwo\n\nthree")]
    for bad in (b"[]", json.dumps({"A": {"title": "A"}}).encode(), b"{"):
        with pytest.raises(ValueError):
            ds.wiki_summaries(bad)


def test_en_wiki_is_opt_in_and_not_part_of_the_defaults() -> None:
    assert "en-wiki" in ds.OPTIONAL_LANGUAGES and "en-wiki" not in ds.ALL_LANGUAGES
    assert ds.check_languages(None) == list(ds.ALL_LANGUAGES)
    assert dm.language_splits("en-wiki") == ("val",) and dm.language_splits("en") == dm.SPLITS
