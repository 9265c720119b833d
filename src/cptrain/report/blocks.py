"""The document model of a report (sections of text, tables and figures) and its one renderer.

Sections build these blocks and know nothing of the output formats; ``render`` walks them once
and writes each block as Markdown and as HTML side by side, so the two files cannot drift
apart. The HTML embeds each figure's PNG so that ``report.html`` can be mailed as one file.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Figure:
    path: Path
    caption: str


@dataclass
class Row:
    """Tables shown side by side in HTML (one after another in Markdown)."""

    tables: list[Table]


Block = str | Table | Figure | Row


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}
th,td{border:1px solid #bbb;padding:.25em .6em;text-align:right}
th{background:#eee}td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}img{max-width:100%;border:1px solid #ddd}
figcaption,.caption{font-size:.88em;color:#555;font-style:italic}
.row{display:flex;flex-wrap:wrap;gap:0 1.5em}
"""


def render(title: str, sections: list[Section], out_dir: Path) -> tuple[str, str]:
    """``(markdown, html)`` of the document; figure links in the Markdown are relative to
    ``out_dir``, where report.md is written."""
    e = html.escape
    md = [f"# {title}", ""]
    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
            f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1>"]
    for sec in sections:
        md += [f"## {sec.title}", ""]
        page.append(f"<h2>{e(sec.title)}</h2>")
        for block in sec.blocks:
            md += _markdown(block, out_dir)
            page += _html(block)
    page.append("</body></html>")
    return "\n".join(md), "\n".join(page)


def _markdown(block: Block, out_dir: Path) -> list[str]:
    """The block's Markdown lines, each block followed by a blank line (a Row's tables one
    after another: Markdown has no side by side)."""
    if isinstance(block, Row):
        return [line for t in block.tables for line in _markdown(t, out_dir)]
    if isinstance(block, Table):
        lines = [f"*{block.caption}*", ""] if block.caption else []
        lines.append("| " + " | ".join(block.header) + " |")
        lines.append("|" + "|".join("---" for _ in block.header) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in block.rows]
    elif isinstance(block, Figure):
        lines = [f"![{block.caption}]({block.path.relative_to(out_dir).as_posix()})",
                 "", f"*{block.caption}*"]
    else:
        lines = [block]
    return [*lines, ""]


def _html(block: Block) -> list[str]:
    e = html.escape
    if isinstance(block, Row):
        return ["<div class='row'>",
                *("<div>" + "\n".join(_html(t)) + "</div>" for t in block.tables), "</div>"]
    if isinstance(block, Table):
        out = [f"<p class='caption'>{e(block.caption)}</p>"] if block.caption else []
        out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in block.header) + "</tr>")
        out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in block.rows]
        return [*out, "</table>"]
    if isinstance(block, Figure):
        data = base64.b64encode(block.path.read_bytes()).decode("ascii")
        return [f"<figure><img alt='{e(block.caption)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{e(block.caption)}</figcaption></figure>"]
    return [f"<p>{e(block)}</p>"]
