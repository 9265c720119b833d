"""The released-model study's paired comparisons (README "Keeping a released model's knowledge
without its data"): MER against its step-size control and the others below, paired by seed,
Holm over all of them, read through cptrain's report API (the run-directory reader).

    .venv/bin/python scripts/study_released_compare.py [runs/study-released]
"""

import sys
from pathlib import Path

from cptrain.report.released import old_rise
from cptrain.report.runs import collect_runs
from cptrain.report.stats import adjust_tests, cell, paired_test

PAIRS = [
    ("mer-self", "seq-lr-matched"), ("mer-self", "replay-self"),
    ("seq-lr-matched", "sequential"), ("KL to start", "sequential"),
    ("kl-proxy", "replay-proxy"), ("L2 to start", "seq-lr-matched"),
    ("KL to start", "seq-lr-matched"), ("replay-proxy", "replay-self"),
]
METRICS = [
    ("old-domain rise", old_rise),
    ("new tasks final", lambda r: r.summary["retained_loss"]),
    ("new tasks learned", lambda r: r.summary["learned_loss"]),
]


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/study-released")
    runs, _ = collect_runs([root])
    by = {(r.label, r.seed): r for r in runs if r.complete}
    tests, rows = [], []
    for a, b in PAIRS:
        seeds = sorted(s for (label, s) in by if label == a and (b, s) in by)
        for name, fn in METRICS:
            tests.append(paired_test([fn(by[(a, s)]) - fn(by[(b, s)]) for s in seeds]))
            rows.append((f"{a} − {b}", name, len(seeds)))
    print(f"paired by seed; Holm over all {len(tests)} comparisons")
    for (pair, name, n), t, p in zip(rows, tests, adjust_tests(tests), strict=True):
        print(f"{pair:32s} {name:18s} n={n}  {cell(t, p)}")


if __name__ == "__main__":
    main()
