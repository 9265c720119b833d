"""`cptrain demo`: English → French → German on the embedded corpus, methods side by side."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from cptrain.config import RunConfig
from cptrain.config_base import apply_overrides, build_config
from cptrain.data.prepare import PrepareConfig, prepare
from cptrain.demo.corpus import demo_corpus_ready, fetch_demo
from cptrain.demo.recipes import prepare_under, read_recipe, under_data_dir
from cptrain.errors import DataError
from cptrain.fsutil import atomic_write_json, atomic_write_text
from cptrain.report.document import write_report
from cptrain.report.tables import comparison_table, run_report
from cptrain.rundir import layout
from cptrain.rundir.run_dir import RunDir, find_runs
from cptrain.train import train

# recipes/demo.yaml: the setting of every method (run_dir, method and data.dir are the demo's);
# sized so that the five methods below fit in 8 minutes on 2 CPU cores in fp32 (see README).
BASE_RUN: dict[str, Any] = read_recipe("demo.yaml")
# recipes/demo-prepare.yaml: the tokenizer and shards of its tasks
PREPARE: dict[str, Any] = read_recipe("demo-prepare.yaml")
TASKS: tuple[str, ...] = tuple(BASE_RUN["data"]["tasks"])

# The paper's Reptile (k=500, ε=0.1) spans tens of thousands of steps; this demo has 219.
# k and ε are scaled down (README, "Reptile at demo scale"): ε as measured at 369 steps, k
# scaled with the steps per task (25 at 123 steps per task, 15 at 73: ~5 meta-updates a task).
REPTILE_K = 15
REPTILE_EPSILON = 0.8

# name → config overrides on top of BASE_RUN
METHODS: dict[str, dict[str, Any]] = {
    "sequential": {"method": "sequential"},
    "replay-25": {"method": "replay", "replay": {"alpha": 0.25}},
    "replay-50": {"method": "replay", "replay": {"alpha": 0.5}},
    "reptile": {"method": "reptile", "reptile": {"k": REPTILE_K, "epsilon": REPTILE_EPSILON}},
    "mer-25": {
        "method": "mer",
        "replay": {"alpha": 0.25},
        "reptile": {"k": REPTILE_K, "epsilon": REPTILE_EPSILON},
    },
}


def prepare_config(data_dir: Path) -> PrepareConfig:
    """recipes/demo-prepare.yaml with its paths under ``data_dir``."""
    raw = prepare_under(json.loads(json.dumps(PREPARE)), data_dir, recipe="demo-prepare.yaml")
    return build_config(PrepareConfig, raw, source="demo prepare config")


def _method_config(
    base: dict[str, Any],
    method: dict[str, Any],
    *,
    run_dir: Path,
    prepared: str,
    overrides: list[str],
    source: str,
) -> RunConfig:
    """``base`` with one method's sections merged in (one level deep), then ``--set``."""
    raw = json.loads(json.dumps(base))
    for key, value in method.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    raw["run_dir"] = str(run_dir)
    raw["data"]["dir"] = prepared
    raw = apply_overrides(raw, overrides)
    return build_config(RunConfig, raw, source=source)


def demo_run_config(name: str, runs_dir: Path, data_dir: Path, overrides: list[str]) -> RunConfig:
    return _method_config(
        BASE_RUN,
        METHODS[name],
        run_dir=runs_dir / name,
        prepared=under_data_dir(BASE_RUN["data"]["dir"], data_dir, recipe="demo.yaml"),
        overrides=overrides,
        source=f"demo config ({name})",
    )


def _train_methods(
    configs: dict[str, RunConfig], *, fresh: bool, progress: bool, what: str
) -> dict[str, dict[str, Any]]:
    """Train each config in turn: a finished run is reused, an interrupted one resumed."""
    results: dict[str, dict[str, Any]] = {}
    for name, cfg in configs.items():
        run_dir = Path(cfg.run_dir)
        if fresh and run_dir.exists():
            shutil.rmtree(run_dir)
        run = RunDir(run_dir)
        if run.finished():
            print(f"[{name}] already trained in {run_dir} (use --fresh to retrain)")
            results[name] = run.summary()
            continue
        resume = run.checkpoint_root.is_dir()
        print(f"[{name}] training {what} in {run_dir}")
        results[name] = train(cfg, resume=resume, progress=progress)
    return results


def run_demo(
    *, runs_dir: Path, data_dir: Path, fresh: bool, progress: bool, overrides: list[str]
) -> dict[str, dict[str, Any]]:
    t0 = time.perf_counter()
    if not demo_corpus_ready(data_dir / "demo", TASKS):
        fetch_demo(data_dir / "demo", TASKS)
    prepare(prepare_config(data_dir), progress=progress)
    configs = {name: demo_run_config(name, runs_dir, data_dir, overrides) for name in METHODS}
    results = _train_methods(configs, fresh=fresh, progress=progress, what=" → ".join(TASKS))
    print()
    for name, s in results.items():
        print(run_report(s, title=f"== {name}: validation loss (row: after task, column: task)"))
        print()
    print(comparison_table(list(results.items())))
    steps = next(iter(results.values()))["steps"] if results else 0
    print(
        "\nforgetting = final loss − best earlier loss, averaged over en and fr (positive = "
        "forgot); retained = mean final loss; learned = mean loss right after each task; grad "
        "cos = mean cos(∇ current task, ∇ replayed or earlier-task rows) after the first task."
        f"\nReptile here: k={REPTILE_K} steps, ε={REPTILE_EPSILON} over {steps} steps (the "
        "paper: k=500, ε=0.1 over tens of thousands of steps)."
    )
    if "mer-25" in results and "replay-25" in results:
        print(mer_vs_replay(results["mer-25"], results["replay-25"]))
    report = write_report([runs_dir], runs_dir / "report")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; runs in {runs_dir}")
    print(f"report: {report}")
    return results


def mer_vs_replay(mer: dict[str, Any], replay: dict[str, Any]) -> str:
    """The demo's closing comparison. One seed per method carries no test, so it never says
    which is better; the demo sweep's seeds can."""
    m, r = mer["retained_loss"], replay["retained_loss"]
    return (
        f"MER 25% retained loss {m:.3f} vs replay 25% {r:.3f} ({m - r:+.3f}): one seed each, so "
        "this cannot tell which of the two retains more; `cptrain sweep "
        "recipes/demo-sweep.yaml` and `cptrain report` compare them over 3 seeds with a test."
    )


# --- `cptrain demo --released`: a released model, continued on French then German ------------
#
# SmolLM2-135M-Instruct (`cptrain models fetch smollm2-135m`) trained on fr → de of the embedded
# corpus; English Wikipedia summaries (en-wiki) are evaluated at every evaluation and never
# trained, so their loss shows what the model forgets of its pre-training. The model's own
# pre-training data is not at hand, so replay is seeded either from a proxy corpus (the English
# Debian docs, prepared as task `en` but neither trained nor evaluated) or from the model's own
# generations.

RELEASED_MODEL = "smollm2-135m"
# recipes/released-smollm2.yaml: the setting of every method (run_dir, method, data.dir and
# model.init_from are the demo's); sized for about 30 minutes on 2 CPU cores in all
# (recipes/README.md, "The released-model demo").
RELEASED_BASE_RUN: dict[str, Any] = read_recipe("released-smollm2.yaml")
# recipes/released-smollm2-prepare.yaml: the shards, with the model's own tokenizer
RELEASED_PREPARE: dict[str, Any] = read_recipe("released-smollm2-prepare.yaml")
RELEASED_TASKS: tuple[str, ...] = tuple(RELEASED_BASE_RUN["data"]["tasks"])
# the tables and sentences below compare against one evaluation-only corpus
(RELEASED_EVAL_ONLY,) = RELEASED_BASE_RUN["data"]["eval_only"]
RELEASED_TOKENS_PER_TASK: int = RELEASED_BASE_RUN["data"]["tokens_per_task"]
RELEASED_PROXY = "en"
# corpus languages `cptrain data fetch-demo` must have built
RELEASED_LANGUAGES = (RELEASED_PROXY, *RELEASED_TASKS, RELEASED_EVAL_ONLY)

RELEASED_SEED_TOKENS = 4_096  # 16 rows of 256: both seeds the same size, self costs generation
# Reptile scaled to 40 steps: a meta-update every 5 steps (4 per task).
RELEASED_REPTILE_K = 5
RELEASED_REPTILE_EPSILON = 0.5
RELEASED_ALPHA = 0.25
RELEASED_LR_MATCHED: float = RELEASED_BASE_RUN["train"]["lr"] * RELEASED_REPTILE_EPSILON
MERGE_LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)
# lm-eval on the starting model and each method's final model: items per local choice task
RELEASED_DOWNSTREAM_ITEMS = 32

PROXY_SEED: dict[str, Any] = {
    "source": "task",
    "task": RELEASED_PROXY,
    "tokens": RELEASED_SEED_TOKENS,
}
SELF_SEED: dict[str, Any] = {
    "source": "self",
    "tokens": RELEASED_SEED_TOKENS,
    "batch_size": 16,
    "prompt": {"task": RELEASED_PROXY, "prefix_tokens": 8},
}

# name → (label in tables and the report, config overrides on top of RELEASED_BASE_RUN)
RELEASED_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "sequential": ("sequential", {"method": "sequential"}),
    # MER's step-size control: Reptile keeps ε of each k-step move, so MER at lr η moves about
    # as far as sequential at ε·η. Over 3 seeds (README "Keeping a released model's knowledge
    # without its data") this lower lr kept English and learned about as well as MER (not
    # significantly worse) at 0.75 of its FLOPs, and replay from a self seed did no better than
    # from the proxy seed, so the demo shows the self seed once, under MER.
    "sequential-lr-matched": (
        f"sequential, lr {RELEASED_LR_MATCHED:g} (MER's step)",
        {"method": "sequential", "train": {"lr": RELEASED_LR_MATCHED}},
    ),
    "replay-25-proxy": (
        "replay, English proxy seed",
        {"method": "replay", "replay": {"alpha": RELEASED_ALPHA, "seed": [PROXY_SEED]}},
    ),
    "mer-25-self": (
        "MER, self seed",
        {
            "method": "mer",
            "replay": {"alpha": RELEASED_ALPHA, "seed": [SELF_SEED]},
            "reptile": {"k": RELEASED_REPTILE_K, "epsilon": RELEASED_REPTILE_EPSILON},
        },
    ),
}


def released_label(name: str) -> str:
    """How tables name a method: its label and, when it replays, α (as the report does)."""
    if name not in RELEASED_METHODS:
        return name
    label, method = RELEASED_METHODS[name]
    alpha = method.get("replay", {}).get("alpha", 0)
    return f"{label} α={alpha:g}" if alpha else label


def released_prepare_config(data_dir: Path, model_dir: Path) -> PrepareConfig:
    """recipes/released-smollm2-prepare.yaml (shards of en, fr, de and, val only, en-wiki) with
    its paths under ``data_dir`` and the tokenizer of ``model_dir``."""
    raw = prepare_under(json.loads(json.dumps(RELEASED_PREPARE)), data_dir,
                        recipe="released-smollm2-prepare.yaml")
    raw["tokenizer"]["path"] = str(model_dir)
    return build_config(PrepareConfig, raw, source="released demo prepare config")


def _released_prepared(data_dir: Path) -> str:
    """Where the released demo's shards are (data.dir of its recipe, under ``data_dir``)."""
    return under_data_dir(RELEASED_BASE_RUN["data"]["dir"], data_dir,
                          recipe="released-smollm2.yaml")


def released_run_config(
    name: str,
    runs_dir: Path,
    data_dir: Path,
    overrides: list[str],
    *,
    model_dir: Path = Path("models") / RELEASED_MODEL,
    precision: str | None = None,
) -> RunConfig:
    """The config of one released-demo method; precision None: the recipe's (auto: bf16 where
    this machine computes it faster, else fp32; the trainer says which)."""
    base = json.loads(json.dumps(RELEASED_BASE_RUN))
    base["model"]["init_from"] = str(model_dir)
    if precision:
        base["train"]["precision"] = precision
    return _method_config(
        base,
        RELEASED_METHODS[name][1],
        run_dir=runs_dir / name,
        prepared=_released_prepared(data_dir),
        overrides=overrides,
        source=f"released demo config ({name})",
    )


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def released_rows(
    results: dict[str, dict[str, Any]], merge: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """One row per method (and per merge λ of the sequential run): English before and after,
    French and German right after training them and at the end, forgetting, retained."""
    en, (fr, de) = RELEASED_EVAL_ONLY, RELEASED_TASKS
    rows = []
    for name, s in results.items():
        cols = [*s["tasks"], *(s.get("eval_only") or [])]
        final = dict(zip(cols, s["loss_matrix"][-1], strict=True))
        rows.append(
            {
                "method": released_label(name),
                "en_before": s["loss_before"][en],
                "en_after": final[en],
                "en_forgetting": s["eval_only_forgetting"][en],
                "fr_learned": s["loss_matrix"][0][0],
                "de_learned": s["loss_matrix"][1][1],
                "fr_end": final[fr],
                "fr_forgetting": s.get("forgetting"),
                "retained": s.get("retained_loss"),
            }
        )
    if merge is not None:
        before = results["sequential"]["loss_before"] if "sequential" in results else None
        for r in merge["rows"]:
            if r["lambda"] in (0.0, 1.0):
                continue  # the starting model and the sequential run's final model
            v = r["val_loss"]
            rows.append(
                {
                    "method": f"merge sequential λ={r['lambda']:g}",
                    "en_before": before[en] if before else None,
                    "en_after": v[en],
                    "en_forgetting": v[en] - before[en] if before else None,
                    "fr_learned": None,
                    "de_learned": None,
                    "fr_end": v[fr],
                    "fr_forgetting": None,
                    "retained": (v[fr] + v[de]) / 2,
                }
            )
    return rows


def released_table(rows: list[dict[str, Any]]) -> str:
    en, (fr, de) = RELEASED_EVAL_ONLY, RELEASED_TASKS
    columns = [
        (f"{en} before→after", lambda r: f"{_fmt(r['en_before'])}→{_fmt(r['en_after'])}"),
        (f"{en} forgot", lambda r: _fmt(r["en_forgetting"], signed=True)),
        (f"{fr} learned", lambda r: _fmt(r["fr_learned"])),
        (f"{de} learned", lambda r: _fmt(r["de_learned"])),
        (f"{fr} at end", lambda r: _fmt(r["fr_end"])),
        (f"{fr} forgot", lambda r: _fmt(r["fr_forgetting"], signed=True)),
        ("retained", lambda r: _fmt(r["retained"])),
    ]
    name_w = max([10, *(len(r["method"]) + 2 for r in rows)])
    widths = [max(len(head), 11) + 2 for head, _ in columns]
    lines = [
        "method".ljust(name_w)
        + "".join(h.rjust(w) for (h, _), w in zip(columns, widths, strict=True))
    ]
    for r in rows:
        lines.append(
            r["method"].ljust(name_w)
            + "".join(cell(r).rjust(w) for (_, cell), w in zip(columns, widths, strict=True))
        )
    return "\n".join(lines)


def _released_merge(run: Path, runs_dir: Path) -> dict[str, Any]:
    """The merge curve of the sequential run, recomputed when a run is newer than it (the
    other runs are its comparison points)."""
    from cptrain.merge import merge_table, write_merge

    out = run / layout.MERGE / "merge.json"
    newest = max(r.summary_path.stat().st_mtime for r in find_runs(runs_dir))
    if not out.is_file() or out.stat().st_mtime < newest:
        print(
            f"[merge] evaluating θ_start + λ(θ_final − θ_start) of {run} for λ in "
            f"{', '.join(f'{x:g}' for x in MERGE_LAMBDAS)}"
        )
        write_merge(run, list(MERGE_LAMBDAS))
    else:
        print(f"[merge] already evaluated in {out.parent}")
    result = RunDir.open(run).merge_curve()
    if result is None:
        raise DataError(f"{out} cannot be read; delete it and run the demo again")
    print(merge_table(result))
    return result


def _released_downstream(
    configs: dict[str, RunConfig], runs_dir: Path, data_dir: Path, model_dir: Path
) -> Path:
    """lm-eval's local tasks on the starting model and on each method's final model."""
    from cptrain.evaluation.downstream_table import before_after_scores, scores_table

    tasks = [RELEASED_EVAL_ONLY, *RELEASED_TASKS]
    print(f"\n== downstream (lm-eval, {RELEASED_DOWNSTREAM_ITEMS} choice items per task, "
          "0-shot): the starting model, then each method's final model")
    rows = before_after_scores(
        model_dir,
        {released_label(n): Path(c.run_dir) for n, c in configs.items()},
        tasks=tasks,
        data_dir=Path(_released_prepared(data_dir)),
        out_dir=runs_dir / "downstream",
        items=RELEASED_DOWNSTREAM_ITEMS,
        max_length=int(RELEASED_BASE_RUN["train"]["seq_len"]),
        bpb=False,  # 18 of 38 minutes; the loss table above already scores held-out text
    )
    text = scores_table(rows, tasks)
    print(text)
    print("acc: 4-way choice of a held-out document's true continuation (chance 0.25, higher "
          "is better); bits per byte: `cptrain downstream RUN --tasks local`")
    atomic_write_json(runs_dir / "downstream.json", {"rows": rows})
    atomic_write_text(runs_dir / "downstream.txt", text + "\n")
    return runs_dir / "downstream.txt"


def _write_labels(runs_dir: Path) -> None:
    """Labels for `cptrain report` (read from sweep.json; it appends α): both replay runs are
    replay α=0.25, and the report would otherwise average them as two seeds of one method."""
    runs = [{"name": name, "label": label} for name, (label, _) in RELEASED_METHODS.items()]
    atomic_write_json(runs_dir / "sweep.json", {"runs": runs})


def run_released_demo(
    *,
    runs_dir: Path,
    data_dir: Path,
    fresh: bool,
    progress: bool,
    overrides: list[str],
    model_dir: Path = Path("models") / RELEASED_MODEL,
) -> dict[str, dict[str, Any]]:
    from cptrain.models import fetch_model, known_model

    t0 = time.perf_counter()
    spec = known_model(RELEASED_MODEL)
    fetch_model(RELEASED_MODEL, model_dir)
    if not demo_corpus_ready(data_dir / "demo", RELEASED_LANGUAGES):
        fetch_demo(data_dir / "demo", RELEASED_LANGUAGES)
    prepare(released_prepare_config(data_dir, model_dir), progress=progress)
    configs = {
        name: released_run_config(name, runs_dir, data_dir, overrides, model_dir=model_dir)
        for name in RELEASED_METHODS
    }
    precision = next(iter(configs.values())).train.precision
    print(f"{spec.title}: {spec.note}; train.precision {precision}")
    what = f"{' → '.join(RELEASED_TASKS)} ({RELEASED_EVAL_ONLY} evaluation only)"
    results = _train_methods(configs, fresh=fresh, progress=progress, what=what)
    runs_dir.mkdir(parents=True, exist_ok=True)
    _write_labels(runs_dir)
    print()
    merge = _released_merge(Path(configs["sequential"].run_dir), runs_dir)
    print()
    for name, s in results.items():
        title = f"== {released_label(name)}: validation loss (row: after task, column: task)"
        print(run_report(s, title=title))
        print()
    print(comparison_table([(released_label(n), s) for n, s in results.items()]))
    print()
    table = released_table(released_rows(results, merge))
    print(table)
    steps = next(iter(results.values()))["steps"]
    seq = results.get("sequential")
    print(
        f"\n{spec.title} ({spec.architecture}), {spec.note}: the 'before' losses are those of "
        f"the dequantized weights. {RELEASED_EVAL_ONLY} = English Wikipedia summaries, never "
        f"trained; {RELEASED_EVAL_ONLY} forgot = its loss at the end − before (positive = "
        f"forgot). {RELEASED_TASKS[0]} forgot = final − best earlier loss; retained = mean "
        f"final loss on {' and '.join(RELEASED_TASKS)}. Proxy seed: {RELEASED_SEED_TOKENS} "
        f"tokens of the English Debian docs; self seed: {RELEASED_SEED_TOKENS} tokens sampled "
        "from the starting model, prompted with 8-token prefixes of English documents. "
        f"Reptile: k={RELEASED_REPTILE_K}, ε={RELEASED_REPTILE_EPSILON} over {steps} steps."
    )
    if seq is not None:
        f = seq["eval_only_forgetting"][RELEASED_EVAL_ONLY]
        print(
            f"Sequential: {RELEASED_EVAL_ONLY} loss {seq['loss_before'][RELEASED_EVAL_ONLY]:.3f}"
            f" → {seq['loss_matrix'][-1][len(RELEASED_TASKS)]:.3f} ({f:+.3f})."
        )
    if seq is not None:
        before = seq["loss_before"][RELEASED_EVAL_ONLY]
        best = min(merge["rows"], key=lambda r: r["val_loss"][RELEASED_EVAL_ONLY])
        if best["val_loss"][RELEASED_EVAL_ONLY] < before:
            print(
                f"Merge λ={best['lambda']:g}: {RELEASED_EVAL_ONLY} "
                f"{best['val_loss'][RELEASED_EVAL_ONLY]:.3f}, below the starting model's "
                f"{before:.3f}: a small move from the start helps English too (the weights' "
                "quantization noise, documents framed by EOS for an instruct model), so "
                "forgetting shows once training moves further."
            )
    mer, control = results.get("mer-25-self"), results.get("sequential-lr-matched")
    if mer is not None and control is not None:
        a = mer["eval_only_forgetting"][RELEASED_EVAL_ONLY]
        b = control["eval_only_forgetting"][RELEASED_EVAL_ONLY]
        print(
            f"{RELEASED_EVAL_ONLY} forgetting: MER {a:+.3f}, sequential at lr "
            f"{RELEASED_LR_MATCHED:g} (MER's effective step, 0.75 of MER's FLOPs) {b:+.3f}; "
            f"retained {mer['retained_loss']:.3f} against {control['retained_loss']:.3f} (one "
            "seed each). Over 3 seeds the README's study found MER not significantly better "
            "than this control: pick a smaller lr first, then a merge toward the start."
        )
    table_path = runs_dir / "table.txt"
    atomic_write_text(table_path, table + "\n")
    scores = _released_downstream(configs, runs_dir, data_dir, model_dir)
    report = write_report([runs_dir], runs_dir / "report")
    print(f"released demo finished in {time.perf_counter() - t0:.0f} s; runs in {runs_dir}")
    print(f"table: {table_path}; merge curve: {Path(configs['sequential'].run_dir) / 'merge'}")
    print(f"report: {report}")
    print(f"downstream scores: {scores}")
    return results
