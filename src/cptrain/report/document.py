"""`cptrain report DIR…`: tables and figures of runs and sweeps → report.md + report.html.

Runs are grouped by method (label and replay fraction α), model preset and task order; seeds
are averaged, with 95% t-intervals across seeds. What a report shows follows the paper: loss
curves with task boundaries (Fig. 2), union loss, forgetting with confidence intervals
(Fig. 4), retained / learned loss by method and size (Tables 2 and 4), downstream scores
(Table 3), loss against FLOPs per incoming token and against parameters with power-law fits
(Fig. 6/7) and the replay-versus-size answer, and gradient-alignment diagnostics. Sections
without data (one size, no downstream results) are left out. ``report.html`` embeds its PNGs
so it can be mailed as one file.

This module puts the report together: runs (``runs``) → sections (``sections``, ``curves``,
``compute``, ``studies``) → one document model rendered to both files (``blocks``).
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Sequence
from pathlib import Path

from cptrain.fsutil import atomic_write_text
from cptrain.report import studies
from cptrain.report.blocks import Section, render
from cptrain.report.compute import compute_section, scaling_section
from cptrain.report.curves import alignment_section, curve_section
from cptrain.report.released import released_section
from cptrain.report.runs import Groups, collect_runs, sweep_baseline
from cptrain.report.sections import (
    downstream_section,
    loss_matrices,
    metric_tables,
    overview,
    runs_table,
)
from cptrain.report.stats import mean_ci
from cptrain.rundir.run_dir import check_run_dirs

# Imported from here by the CLI, the demo and the tests.
__all__ = ["build_sections", "collect_runs", "mean_ci", "write_report"]


def build_sections(dirs: Sequence[Path], fig_dir: Path) -> list[Section]:
    runs, notes = collect_runs(dirs)
    done = [r for r in runs if r.complete]
    sections = [overview(runs, done, dirs, notes)]
    if done:
        g = Groups(done)
        sections += [metric_tables(g, fig_dir), curve_section(g, fig_dir)]
        baseline = sweep_baseline(dirs)
        optional = [studies.paired_section(done, baseline),
                    studies.reptile_map_section(done, baseline, fig_dir),
                    studies.replay_ratio_section(done, fig_dir),
                    studies.size_vs_replay_section(done),
                    released_section(done, baseline, fig_dir),
                    scaling_section(done, fig_dir), downstream_section(g),
                    alignment_section(g, fig_dir)]
        sections += [s for s in optional if s is not None]
        sections += [compute_section(g), loss_matrices(g)]
    sections.append(runs_table(runs))
    return sections


def write_report(dirs: Sequence[Path], out_dir: Path) -> Path:
    """Write ``out_dir/report.md``, ``out_dir/report.html`` and ``out_dir/figures/``; returns
    the HTML path."""
    out_dir = Path(out_dir)
    check_run_dirs(dirs)  # before out_dir (often inside the first of them) is made
    fig_dir = out_dir / "figures"
    made = not out_dir.exists()
    fig_dir.mkdir(parents=True, exist_ok=True)
    try:
        sections = build_sections([Path(d) for d in dirs], fig_dir)
    except BaseException:
        if made:  # no runs, or a failure: leave no empty report directory behind
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    title = f"cptrain report ({stamp})"
    markdown, page = render(title, sections, out_dir)
    atomic_write_text(out_dir / "report.md", markdown)
    html_path = out_dir / "report.html"
    atomic_write_text(html_path, page)
    return html_path
