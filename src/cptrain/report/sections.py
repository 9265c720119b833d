"""The report's sections of results per method and size: the overview, forgetting and the
retained / learned / union loss with their tests (paper Fig. 4, Tables 2 and 4), the loss
matrices, downstream scores (Table 3) and the list of all runs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cptrain.report.blocks import Figure, Row, Section, Table
from cptrain.report.figures import bars_figure
from cptrain.report.runs import Groups, Run
from cptrain.report.stats import METHOD, fmt, mean_ci, n_note, versus_lowest


def overview(runs: list[Run], done: list[Run], dirs: Sequence[Path], notes: list[str]) -> Section:
    sec = Section("Overview")
    seeds = sorted({r.seed for r in done})
    sec.blocks.append(
        f"{len(runs)} runs from {', '.join(map(str, dirs))}: {len(done)} complete"
        + (f", {len(runs) - len(done)} in progress (left out of the tables)"
           if len(runs) > len(done) else "")
        + f"; seeds {', '.join(map(str, seeds)) or '–'}. Losses are validation cross-entropy "
        "(nats per token); ± is the half width of the 95% t-interval across seeds."
    )
    sec.blocks.append(
        "Forgetting = final loss − best earlier loss of each task, averaged over all tasks but "
        "the last (positive = forgot); retained = mean final loss over all tasks; learned = "
        "mean loss on each task right after training it; union = loss on all tasks' "
        "validation windows together (a task with fewer windows weighs less)."
    )
    sec.blocks += notes
    caution = precision_caution(done, "what the runs vary")
    if caution:
        sec.blocks.append(caution)
    return sec


def precision_caution(runs: Sequence[Run], varied: str) -> str | None:
    """A caution naming each precision's runs when ``runs`` trained at more than one:
    ``train.precision: auto`` picks per model width and machine, so a sweep over sizes (or
    over machines) can train its groups at different precisions without saying so."""
    by: dict[str, set[str]] = {}
    for r in runs:
        if r.summary.get("precision"):
            by.setdefault(str(r.summary["precision"]), set()).add(f"{r.preset} {r.group}")
    if len(by) < 2:
        return None
    each = "; ".join(f"{p}: {', '.join(sorted(names))}" for p, names in sorted(by.items()))
    return (
        f"Caution: these runs trained at different precisions ({each}), so {varied} is "
        "confounded with precision; set train.precision for all of them."
    )


def metric_tables(g: Groups, fig_dir: Path) -> Section:
    sec = Section("Forgetting, retained and learned loss (paper Fig. 4, Tables 2 and 4)")
    sec.blocks.append(g.metric_table("forgetting", "Forgetting by method and model size "
                                     "(lower is better)", signed=True))
    sec.blocks.append(g.metric_table("retained_loss", "Table 2 — retained loss (mean final loss "
                                     "over all tasks; lower is better)"))
    sec.blocks.append(g.metric_table("learned_loss", "Table 4 — learned loss (loss on each task "
                                     "right after training it; lower is better)"))
    sec.blocks.append(g.metric_table("union_loss", "Union loss after the last task"))
    if any("forgetting_paper_code" in r.summary for rs in g.by.values() for r in rs):
        sec.blocks.insert(1, g.metric_table(
            "forgetting_paper_code", "Forgetting as the paper's official code computes it "
            "(its sign and averaging, comparable with the paper's Fig. 4; see the README)",
            signed=True))
    for key, name in (("forgetting", "forgetting"), ("retained_loss", "retained loss"),
                      ("learned_loss", "learned loss")):
        sec.blocks += overlap_words(g, key, name)
    sec.blocks.append(n_note([len(rs) for rs in g.by.values()], "seeds per method and size",
                             paired=False))
    fig = _forgetting_figure(g, fig_dir)
    if fig:  # right below the forgetting table it draws
        sec.blocks.insert(1, fig)
    return sec


def overlap_words(g: Groups, key: str, name: str) -> list[str]:
    """Which methods are significantly higher than the lowest one, by Welch t-tests
    Holm-adjusted over every pair of methods of one preset and order; with one seed somewhere
    there is no test and no ranking is claimed."""
    out = []
    for order in g.orders:
        for p in g.presets:
            values = {grp: [r.summary.get(key) for r in g.by[(grp, p, order)]]
                      for grp in g.groups if (grp, p, order) in g.by}
            values = {k: v for k, v in values.items() if any(x is not None for x in v)}
            if len(values) < 2:
                continue
            where = p + ("" if len(g.orders) == 1 else f" [{'→'.join(order)}]")
            found = versus_lowest(values)
            if found is None:
                out.append(f"{name.capitalize()}, {where}: some methods have one seed, so "
                           "there is no test: cannot tell which is lowest.")
                continue
            best, higher, same = found
            bm = mean_ci(values[best])[0]
            out.append(
                f"{name.capitalize()}, {where}: lowest mean {best} ({bm:.3f}); "
                + (f"no significant difference from {_listed(same)}; " if same else "")
                + f"{len(higher)} method(s) significantly higher"
                + (f": {_listed(higher)}" if higher else "") + f" (Welch t-tests, {METHOD}-"
                f"adjusted across {len(values) * (len(values) - 1) // 2} pair(s) of methods)."
            )
    return out


def _listed(items: list[str]) -> str:
    return ", ".join(items[:8]) + (f" and {len(items) - 8} more" if len(items) > 8 else "")


def _forgetting_figure(g: Groups, fig_dir: Path) -> Figure | None:
    names = [g.row_name(grp, o) for grp, o in g.keyed()]
    series = {
        p: [mean_ci([r.summary.get("forgetting") for r in g.by.get((grp, p, o), [])])
            for grp, o in g.keyed()]
        for p in g.presets
    }
    path = bars_figure(names, series, fig_dir / "forgetting.png",
                       ylabel="forgetting (Δ loss, nats)",
                       title="Forgetting per method, 95% CI across seeds")
    return Figure(path, "Forgetting per method and size; error bars: 95% t-interval across "
                        "seeds (paper Fig. 4).") if path else None


def loss_matrices(g: Groups) -> Section:
    sec = Section("Loss matrices (row: after task, column: task; mean over seeds)")
    for grp, order in g.keyed():
        row = Row([])
        sec.blocks.append(row)
        for p in g.presets:
            runs = g.by.get((grp, p, order), [])
            if not runs:
                continue
            m = np.mean([np.asarray(r.summary["loss_matrix"], dtype=float) for r in runs], axis=0)
            eval_only = list(runs[0].summary.get("eval_only") or [])
            columns = [*order, *eval_only]
            rows = [[f"after {order[i]}", *(f"{v:.3f}" for v in row)] for i, row in enumerate(m)]
            befores = [r.summary.get("loss_before") or {} for r in runs]
            if all(set(columns) <= set(b) for b in befores):
                before = np.mean([[b[c] for c in columns] for b in befores], axis=0)
                rows.insert(0, ["before", *(f"{v:.3f}" for v in before)])
            header = ["", *order, *(f"{t} (eval only)" for t in eval_only)]
            row.tables.append(Table(header, rows, f"{g.row_name(grp, order)} · {p}"))
    return sec


def downstream_section(g: Groups) -> Section | None:
    tasks = sorted({t for rs in g.by.values() for r in rs for t in r.downstream})
    if not tasks:
        return None
    main = {t: ("bits_per_byte" if "bpb" in t else "acc_norm") for t in tasks}
    rows = []
    for grp, order in g.keyed():
        for p in g.presets:
            runs = [r for r in g.by.get((grp, p, order), []) if r.downstream]
            if not runs:
                continue
            cells = []
            for t in tasks:
                vals = [r.downstream.get(t, {}).get(main[t]) for r in runs]
                if main[t] not in next((r.downstream[t] for r in runs if t in r.downstream), {}):
                    vals = [r.downstream.get(t, {}).get("acc") for r in runs]
                cells.append(fmt(*mean_ci([v for v in vals if v is not None])))
            rows.append([f"{g.row_name(grp, order)} · {p} (n={len(runs)})", *cells])
    header = ["model", *(f"{t} ({main[t]})" for t in tasks)]
    return Section("Downstream evaluation (paper Table 3)", [Table(
        header, rows, "lm-evaluation-harness, final model of each run; acc_norm: higher is "
                      "better (chance 0.25 on 4-way choice); bits per byte: lower is better.")])


def runs_table(runs: list[Run]) -> Section:
    rows = []
    for r in sorted(runs, key=lambda r: r.name):
        s = r.summary
        rows.append([r.name, r.group, r.preset, str(r.seed), "→".join(r.order),
                     fmt(s.get("forgetting"), signed=True),
                     fmt(s.get("forgetting_paper_code"), signed=True),  # "–" for older runs
                     fmt(s.get("forgetting_task_end"), signed=True),
                     fmt(s.get("retained_loss")),
                     fmt(s.get("learned_loss")), fmt(s.get("union_loss")),
                     "yes" if r.complete else f"no ({len(s['loss_matrix'])} tasks)"])
    return Section("All runs", [Table(["run", "method", "preset", "seed", "order", "forgetting",
                                       "forgetting (paper code)", "forgetting (task-end only)",
                                       "retained", "learned", "union", "complete"], rows)])
