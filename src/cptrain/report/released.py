"""A released model continued on new tasks while its old domain is only evaluated: what each
method keeps of the old domain against what it learns, side by side (the released-model study).

Shown when complete runs measured evaluation-only tasks before training. Per method (seeds
averaged, 95 % t-intervals): the old domain's rise (final − before, mean over evaluation-only
tasks; positive = forgot), the new tasks' final loss (retained loss), their loss right after
training each (learned loss) and the FLOPs per incoming token; each method against the sweep's
baseline paired by seed, Holm-adjusted down each column; a Pareto figure with the baseline's
merge curve θ_start + λ(θ_final − θ_start) (``cptrain merge``) as a line.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cptrain.report.blocks import Figure, Section, Table
from cptrain.report.figures import pareto_figure
from cptrain.report.runs import Run
from cptrain.report.stats import (
    METHOD,
    adjust_tests,
    cell,
    family_note,
    fmt,
    mean_ci,
    n_note,
    paired_test,
    versus_lowest,
)
from cptrain.report.studies import pairs
from cptrain.rundir.run_dir import RunDir


def old_rise(run: Run) -> float | None:
    """Mean rise of the evaluation-only tasks' loss since the start (positive = forgot)."""
    found = run.summary.get("eval_only_forgetting")
    if not isinstance(found, dict) or not found:
        return None
    return float(np.mean(list(found.values())))


def _new_final(run: Run) -> float | None:
    return run.summary.get("retained_loss")


def _flops(run: Run) -> float | None:
    return (run.flops or {}).get("flops_per_incoming_token")


COLUMNS = (("old-domain rise", old_rise), ("new tasks final", _new_final),
           ("new tasks learned", lambda r: r.summary.get("learned_loss")))


def merge_line(runs: Sequence[Run]) -> list[tuple[float, float, float]]:
    """(λ, old-domain rise, new tasks' loss) of the merge curves of ``runs``, averaged over the
    runs that have one, λ by λ."""
    by_lambda: dict[float, list[tuple[float, float]]] = defaultdict(list)
    for r in runs:
        curve = RunDir.open(r.dir).merge_curve()
        before = r.summary.get("loss_before") or {}
        old = [before.get(c) for c in r.summary.get("eval_only") or []]
        if curve is None or not old or any(v is None for v in old):
            continue
        start = float(np.mean(old))
        for row in curve["rows"]:
            by_lambda[float(row["lambda"])].append((row["old_loss"] - start, row["new_loss"]))
    return [(lam, float(np.mean([p[0] for p in pts])), float(np.mean([p[1] for p in pts])))
            for lam, pts in sorted(by_lambda.items())]


def released_section(done: Sequence[Run], baseline: str | None, fig_dir: Path) -> Section | None:
    runs = [r for r in done if old_rise(r) is not None]
    groups: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        groups[r.group].append(r)
    if len(groups) < 2:
        return None
    sec = Section("Old domain kept against new tasks learned (evaluation-only tasks)")
    base_flops = [f for r in runs if r.label == baseline and (f := _flops(r))]
    rows = []
    for g, rs in groups.items():
        f = [x for r in rs if (x := _flops(r))]
        ratio = (f"×{np.mean(f) / np.mean(base_flops):.2f}" if f and base_flops else "–")
        rows.append([g, str(len(rs)),
                     *(fmt(*mean_ci([fn(r) for r in rs]), signed=(i == 0))
                       for i, (_, fn) in enumerate(COLUMNS)),
                     f"{np.mean(f):.3g} ({ratio})" if f else "–"])
    sec.blocks.append(
        "Old domain: the tasks evaluated but never trained (what the model knew); its rise is "
        "final loss − loss before training (positive = forgot). New tasks final: their mean "
        "loss at the end (retained loss); learned: right after training each. Mean ± 95% "
        "t-interval over seeds. " + n_note([len(rs) for rs in groups.values()], "seeds per "
                                            "method", paired=False))
    sec.blocks.append(Table(["method", "seeds", *(n for n, _ in COLUMNS),
                             f"FLOPs per incoming token (vs {baseline or 'baseline'})"], rows))
    if baseline:
        _paired(sec, runs, baseline)
    points = [{"group": g, "x": mean_ci([old_rise(r) for r in rs]),
               "y": mean_ci([_new_final(r) for r in rs])} for g, rs in groups.items()]
    line = merge_line([r for r in runs if r.label == baseline]) if baseline else []
    path = pareto_figure(points, line, fig_dir / "released_pareto.png",
                         xlabel="old-domain loss rise (final − before; lower kept more)",
                         ylabel="new tasks' final loss (lower learned more)",
                         line_label=f"merge of {baseline}: θ_start + λ(θ_final − θ_start)")
    if path is not None:
        sec.blocks.append(Figure(path, "Each method a point (mean over seeds, 95% intervals "
                                       "both ways); down and to the left is better." +
                                 (" The line: the baseline's merge curve, λ from 0 (the "
                                  "start model) to 1 (its final model)." if line else "")))
    _words(sec, groups)
    return sec


def _paired(sec: Section, runs: Sequence[Run], baseline: str) -> None:
    found = pairs(runs, baseline)
    if not found:
        return
    names = sorted(found)
    cols = COLUMNS[:2]
    tests = {n: [paired_test([a - b for r, base in found[g]
                              if (a := fn(r)) is not None and (b := fn(base)) is not None])
                 for g in names] for n, fn in cols}
    adj = {n: adjust_tests(ts) for n, ts in tests.items()}
    rows = [[g, str(len(found[g])), *(cell(tests[n][i], adj[n][i]) for n, _ in cols)]
            for i, g in enumerate(names)]
    sec.blocks.append(Table(["method", "pairs", *(f"Δ {n} vs {baseline}" for n, _ in cols)],
                            rows, f"Each run minus the {baseline} run of its seed; negative = "
                                  f"lower loss. {family_note(len(names), 'methods')}"))


def _words(sec: Section, groups: dict[str, list[Run]]) -> None:
    for name, fn in COLUMNS[:2]:
        ranked = versus_lowest({g: [v for r in rs if (v := fn(r)) is not None]
                                for g, rs in groups.items()})
        if ranked is None:
            sec.blocks.append(f"Lowest {name}: cannot tell, a method has a single seed.")
            continue
        best, higher, same = ranked
        text = f"Lowest {name}: {best}"
        text += (f"; not distinguishable from it ({METHOD} over all pairs): {', '.join(same)}"
                 if same else "; every other method significantly higher")
        sec.blocks.append(text + ".")
