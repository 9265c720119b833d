"""report/blocks.py: one document model rendered to Markdown and HTML alike."""

from cptrain.report.blocks import Figure, Row, Section, Table, render


def test_one_model_renders_to_markdown_and_html_alike(tmp_path):
    png = tmp_path / "figures" / "f.png"
    png.parent.mkdir()
    png.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    sections = [Section("Results & <more>", [
        "a <b> paragraph",
        Table(["", "x"], [["a", "1"]], "caption"),
        Row([Table(["m"], [["1"]]), Table(["n"], [["2"]], "second")]),
        Figure(png, "a figure"),
    ])]
    md, page = render("title", sections, tmp_path)
    assert md == "\n".join([
        "# title", "", "## Results & <more>", "", "a <b> paragraph", "",
        "*caption*", "", "|  | x |", "|---|---|", "| a | 1 |", "",
        "| m |", "|---|", "| 1 |", "",
        "*second*", "", "| n |", "|---|", "| 2 |", "",
        "![a figure](figures/f.png)", "", "*a figure*", "",
    ])
    assert "<h2>Results &amp; &lt;more&gt;</h2>\n<p>a &lt;b&gt; paragraph</p>" in page
    assert "<div class='row'>\n<div><table><tr><th>m</th></tr>" in page
    assert "<div><p class='caption'>second</p>\n<table><tr><th>n</th></tr>" in page
    assert "src='data:image/png;base64,iVBORw0KGgpub3QgcmVhbGx5'" in page
    assert page.startswith("<!doctype html>") and page.endswith("</body></html>")

