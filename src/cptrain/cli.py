"""Command line: ``cptrain prepare | train | eval | demo | data fetch-demo``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cptrain import fsutil
from cptrain.errors import ConfigError, CptrainError


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=3e-4 (repeatable)",
    )


def _progress(args: argparse.Namespace) -> bool:
    # off only on request: away from a terminal, progress.progress_bar prints plain lines
    return not args.no_progress


def cmd_fetch_demo(args: argparse.Namespace) -> int:
    from cptrain.demo.corpus import fetch_demo

    fetch_demo(Path(args.out), args.languages or None, force=args.force)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from cptrain.config_base import load_config
    from cptrain.data.prepare import PrepareConfig, load_prepared, prepare

    cfg = load_config(PrepareConfig, Path(args.config), args.overrides)
    out = prepare(cfg, progress=_progress(args))
    print(f"prepared data in {out}")
    for name, splits in load_prepared(out)["tasks"].items():
        # What a user needs to choose data.tokens_per_task (and to see a thin val split).
        print(f"  {name}: " + ", ".join(f"{split} {s['num_tokens']:,} tokens "
                                        f"({s['num_documents']:,} documents)"
                                        for split, s in splits.items()))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cptrain.config import load_run_config

    # Validate before importing the trainer: a config mistake is reported without the seconds
    # that torch and transformers take to import.
    cfg = load_run_config(Path(args.config), args.overrides)
    mode = args.resume or args.restart or args.auto_resume
    from cptrain.train.preflight import preflight

    data = preflight(cfg, mode)  # data and run-directory mistakes, still without torch
    from cptrain.report.tables import run_report
    from cptrain.rundir.run_dir import RunDir
    from cptrain.train import train

    summary = train(
        cfg,
        resume=mode,
        progress=_progress(args),
        allow_config_change=args.allow_config_change,
        data=data,
    )
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun the report is rank 0's to print, once
    print(run_report(summary, title=f"run {cfg.run_dir}: validation loss"))
    if line := compute_line(summary):
        print(line)
    print(f"summary: {RunDir(Path(cfg.run_dir)).summary_path}")
    return 0


def compute_line(summary: dict) -> str | None:
    """Where a run's time went, its training tokens/s and MFU (None for a summary written
    before cptrain measured them)."""
    train_s = summary.get("train_s")
    if not isinstance(train_s, int | float) or train_s <= 0:
        return None
    rate = summary.get("tokens_per_s") or 0.0
    line = (
        f"compute: {summary.get('precision', '?')}, {rate:,.0f} training tokens/s; "
        f"training steps {train_s:.0f} s, evaluation {summary.get('eval_s', 0.0):.0f} s, "
        f"checkpoints {summary.get('checkpoint_s', 0.0):.0f} s, "
        f"exports {summary.get('export_s', 0.0):.0f} s"
    )
    parts = train_s + sum(summary.get(k) or 0.0 for k in ("eval_s", "checkpoint_s", "export_s"))
    if summary.get("diagnostics_s"):  # measurements, timed apart from training
        line += f", diagnostics {summary['diagnostics_s']:.0f} s"
        parts += summary["diagnostics_s"]
    wall = summary.get("wall_s") or 0.0
    # the rest: the first evaluation, data and buffer set-up, summaries (what the parts miss)
    line += f", other {max(wall - parts, 0.0):.0f} s of {wall:.0f} s wall"
    if isinstance(summary.get("mfu"), int | float):
        line += (
            f"; MFU {100 * summary['mfu']:.1f}% of {summary['peak_flops']:.3g} FLOP/s "
            f"({summary.get('peak_dtype', '?')} matmul peak, measured)"
        )
    return line


def _read_summary(run: Path) -> dict:
    from cptrain.rundir.run_dir import RunDir
    from cptrain.rundir.summary import read_summary

    return RunDir(run).summary() if run.is_dir() or not run.suffix else read_summary(run)


def cmd_eval(args: argparse.Namespace) -> int:
    from cptrain.report.tables import comparison_table, run_report

    summaries = [(run, _read_summary(Path(run))) for run in args.runs]
    for run, summary in summaries:
        print(run_report(summary, title=f"run {run}: validation loss"))
        if line := compute_line(summary):
            print(line)
    if len(summaries) > 1:  # side by side, one seed each: `cptrain report` tests differences
        print("\nside by side (one run each, no test; `cptrain report RUN…` compares seeds):")
        print(comparison_table([(Path(r).name, s) for r, s in summaries]))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from cptrain.rundir.run_dir import require_finished

    require_finished(Path(args.run))  # before torch is imported: a wrong path fails at once
    from cptrain.merge import merge_table, parse_lambdas, write_merge

    lambdas = parse_lambdas(args.lambdas)
    out = write_merge(Path(args.run), lambdas)
    print(merge_table(json.loads((out / "merge.json").read_text(encoding="utf-8"))))
    print(f"wrote {out / 'merge.md'} and {out / 'merge.png'}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from cptrain.doctor import main_doctor, main_hardware

    if not args.run and not args.hardware:
        raise ConfigError("cptrain doctor: pass a run directory, or --hardware")
    rc = main_hardware() if args.hardware else 0
    return max(rc, main_doctor(Path(args.run))) if args.run else rc


def cmd_export(args: argparse.Namespace) -> int:
    run = Path(args.run)
    nothing = ConfigError(f"{run}: no complete checkpoint to export; train (or resume) it first")
    if not (run / "checkpoints").is_dir():
        raise nothing  # before torch is imported: a mistyped path fails at once

    from cptrain import checkpoint as ckpt
    from cptrain.checkpoint.export import export_checkpoint

    path, skipped = ckpt.latest_complete(run / "checkpoints")
    if path is None:
        raise nothing
    for reason in skipped:
        print(f"skipping damaged or incomplete checkpoint {reason}")
    out = Path(args.out) if args.out else run / "export"
    export_checkpoint(path, out)
    print(f"exported {path.name} to {out} (load with AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from cptrain.sweep import run_sweep

    try:
        run_sweep(
            Path(args.config),
            overrides=args.overrides,
            progress=_progress(args),
            dry_run=args.dry_run,
        )
    except KeyboardInterrupt:
        print("cptrain: interrupted; re-run `cptrain sweep` to continue", file=sys.stderr)
        return 130
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from cptrain.plan.command import run_plan

    try:
        run_plan(Path(args.config), overrides=args.overrides, do_verify=args.verify,
                 progress=_progress(args))
    except KeyboardInterrupt:
        print("cptrain: interrupted; re-run `cptrain plan` to continue", file=sys.stderr)
        return 130
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cptrain.rundir.run_dir import check_run_dirs

    dirs = [Path(d) for d in args.dirs]
    check_run_dirs(dirs)  # a mistyped path fails in a blink: the report's imports take seconds

    from cptrain.report.document import write_report

    out = Path(args.out) if args.out else (dirs[0] / "report" if len(dirs) == 1 else Path("report"))
    html = write_report(dirs, out)
    print(f"report: {html}")
    print(f"        {html.with_suffix('.md')}")
    return 0


def cmd_downstream(args: argparse.Namespace) -> int:
    from cptrain.evaluation.downstream import format_results, run_downstream

    rec = run_downstream(
        Path(args.target),
        tasks=tuple(t for part in args.tasks for t in part.split(",") if t),
        out_dir=Path(args.out) if args.out else None,
        data_dir=Path(args.data) if args.data else None,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        max_length=args.max_length,
        items=args.items,
        online=args.online,
        device=args.device,
    )
    print(format_results(rec))
    print(rec["path"])
    return 0


DEMO_RUNS_DIR = "runs/demo"
RELEASED_RUNS_DIR = "runs/demo-released"


def cmd_demo(args: argparse.Namespace) -> int:
    from cptrain.demo.embedded import run_demo, run_released_demo

    runs_dir = args.runs_dir
    if args.released and runs_dir == DEMO_RUNS_DIR:
        runs_dir = RELEASED_RUNS_DIR
    (run_released_demo if args.released else run_demo)(
        runs_dir=Path(runs_dir),
        data_dir=Path(args.data_dir),
        fresh=args.fresh,
        progress=_progress(args),
        overrides=args.overrides,
    )
    return 0


def cmd_models_fetch(args: argparse.Namespace) -> int:
    from cptrain.models.fetch import fetch_model

    fetch_model(args.name, Path(args.out) if args.out else None)
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from cptrain.models.fetch import default_out, verify_manifest
    from cptrain.models.registry import KNOWN_MODELS

    for m in KNOWN_MODELS.values():
        here = " [fetched]" if verify_manifest(default_out(m.name), m.name) is None else ""
        print(
            f"{m.name}{here}: {m.title} ({m.architecture}); {m.license}; from PyPI "
            f"{m.requirement}, {m.quantization} GGUF dequantized to fp32"
        )
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cptrain")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cptrain",
        description="Continual pre-training of Llama models with replay and Reptile.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenize text into per-task token shards")
    p.add_argument("config", help="prepare config (YAML)")
    _add_overrides(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train on the tasks in sequence")
    p.add_argument("config", help="run config (YAML)")
    _add_overrides(p)
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    start.add_argument(
        "--restart",
        action="store_const",
        const="restart",
        default=False,
        help="start the run again; what its run_dir holds is moved to run_dir/attempts/<n>/",
    )
    start.add_argument(
        "--auto-resume",
        action="store_const",
        const="auto",
        default=False,
        help="--resume when the run has a complete checkpoint, else --restart (for requeued jobs)",
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even though result-changing settings differ from the checkpoint's",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="print a run's loss matrix and metrics")
    p.add_argument("runs", nargs="+", help="run directories")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "doctor",
        help="check a run directory and say how to resume it; --hardware: measure this "
        "machine's probes (matmul peak, bf16 speedup) again",
    )
    p.add_argument("run", nargs="?", help="run directory")
    p.add_argument(
        "--hardware",
        action="store_true",
        help="measure the matmul peak and the bf16 speedups behind precision: auto again, "
        "ignoring the cache; show the cached and the new values and cache the new ones",
    )
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("export", help="copy a run's newest checkpoint as a HF model directory")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", help="output directory (default: RUN/export)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="the embedded-corpus demo: en → fr → de")
    p.add_argument("--runs-dir", default=DEMO_RUNS_DIR,
                   help=f"where the demo's runs go (default: {DEMO_RUNS_DIR})")
    p.add_argument(
        "--released",
        action="store_true",
        help="continue SmolLM2-135M-Instruct on fr → de, English evaluation-only "
        f"(runs in {RELEASED_RUNS_DIR} unless --runs-dir is given)",
    )
    p.add_argument("--data-dir", default="data",
                   help="where the demo corpus and its prepared shards go (default: data)")
    p.add_argument("--fresh", action="store_true", help="retrain runs that already finished")
    _add_overrides(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("sweep", help="run a grid of runs (methods x alphas x sizes x seeds)")
    p.add_argument("config", help="sweep config (YAML), e.g. recipes/demo-sweep.yaml")
    _add_overrides(p)
    p.add_argument("--dry-run", action="store_true", help="list the runs, train nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("plan", help="pilot runs → predicted forgetting and learning for any "
                       "replay ratio and lr → a recommended setting within a forgetting budget")
    p.add_argument("config", help="plan file (YAML), e.g. recipes/plan-demo.yaml")
    _add_overrides(p)
    p.add_argument("--verify", action="store_true",
                   help="then train the recommended setting at the full budget and compare")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("report", help="tables and figures (report.md / report.html) of runs")
    p.add_argument("dirs", nargs="+", help="run or sweep directories")
    p.add_argument("--out", help="output directory (default: DIR/report for one DIR)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("downstream", help="lm-evaluation-harness on a run or checkpoint")
    p.add_argument("target", help="run dir, models/after_*, checkpoints/step_N or HF dir")
    p.add_argument(
        "--tasks",
        nargs="+",
        default=["local"],
        help="'local' (generated offline tasks) and/or lm-eval task names",
    )
    p.add_argument("--limit", type=int, help="at most this many items per task (a quick look)")
    p.add_argument("--num-fewshot", type=int, default=0, help="in-context examples (default 0)")
    p.add_argument("--batch-size", type=int, default=16, help="items per forward (default 16)")
    p.add_argument("--max-length", type=int,
                   help="context window (default: the model's own, its config's positions)")
    p.add_argument("--items", type=int, default=200, help="items per generated local task")
    p.add_argument("--data", help="prepared data dir (default: the run's data.dir)")
    p.add_argument("--out", help="where to write results")
    p.add_argument("--online", action="store_true", help="allow hub downloads (hub tasks)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.set_defaults(func=cmd_downstream)

    p = sub.add_parser("merge", help="evaluate the run's weights merged with its starting model")
    p.add_argument("run", help="a finished run directory")
    p.add_argument("--lambdas", default="0,0.25,0.5,0.75,1", help="θ_start + λ(θ_final − θ_start)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("data", help="data utilities")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("fetch-demo", help="build the embedded multilingual demo corpus")
    q.add_argument("--out", default="data/demo", help="output directory (default: data/demo)")
    q.add_argument("--languages", nargs="*", help="subset, e.g. en fr de (default: all)")
    q.add_argument("--force", action="store_true", help="rebuild even if up to date")
    q.set_defaults(func=cmd_fetch_demo)

    p = sub.add_parser("models", help="released models to continue (model.init_from)")
    msub = p.add_subparsers(dest="models_command", required=True)
    q = msub.add_parser("fetch", help="download a known model as a Hugging Face directory")
    q.add_argument("name", help="a name from `cptrain models list`")
    q.add_argument("--out", help="output directory (default: models/NAME)")
    q.set_defaults(func=cmd_models_fetch)
    q = msub.add_parser("list", help="the known models")
    q.set_defaults(func=cmd_models_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that left (`| head`) shows up here, not at interpreter exit
        return code
    except BrokenPipeError:
        # as other command-line tools do: stop quietly; the rest of the output has nowhere to go
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except CptrainError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"cptrain: error: {msg}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if fsutil.disk_full_errno(exc) is None:
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        print(
            f"cptrain: error: disk full{where}; free space, then re-run with --auto-resume "
            "(it resumes from the last complete checkpoint, or restarts where none is)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("cptrain: interrupted; continue with --auto-resume (it resumes from the last "
              "complete checkpoint, or restarts where none was written yet)", file=sys.stderr)
        return 130


def _exit(code: int) -> None:
    """Under torchrun, skip interpreter teardown: with gloo it can hang after a finished run
    (seen once in ~10 CI runs: both ranks done, one never exited). Everything is written and
    fsynced by then. (torchrun's variables are read here directly: importing cptrain.distributed
    would load torch just to exit.)"""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
