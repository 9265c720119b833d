"""A released model (SmolLM2-135M) in cptrain: training tokens/s of the loop vs a bare loop, and
self-seed generation tokens/s vs plain ``model.generate`` at the same batch and length.

Blocks alternate (cptrain, bare, cptrain, bare, …) in one process so that machine noise hits
both alike; medians and ratios are printed. Fetches the model and prepares English demo text
with its tokenizer on first use.

    .venv/bin/python benches/released.py [--seq-len 256] [--batch-size 8] [--precision fp32]

``--anchors`` instead measures the anchors to the start model: training tokens/s with the KL anchor
(one extra forward of the start model per step) and with L2-to-start (one fused pass over the
weights per step), each ÷ the same loop without, blocks alternating in one process; and peak
memory (VmHWM of a child process that builds the run and trains 3 steps) with ÷ without.

``--gen-options`` instead measures what makes self-seed generation faster: cptrain's sampler at
batch 8 / 16 / 32 / 64 in fp32 and in bf16 autocast, and plain ``generate`` with its static KV
cache against its dynamic one (same batch and length), side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from throughput import bare_loop

from cptrain.config import RunConfig
from cptrain.config_base import build_config
from cptrain.data.prepare import PrepareConfig, open_split, prepare
from cptrain.demo.corpus import demo_corpus_ready, fetch_demo
from cptrain.models.build import load_pretrained
from cptrain.models.fetch import fetch_model
from cptrain.replay.seeding import generate_rows
from cptrain.train import Trainer


def prepared_english(data_dir: Path, model_dir: Path) -> Path:
    if not demo_corpus_ready(data_dir / "demo", ["en"]):
        fetch_demo(data_dir / "demo", ["en"])
    cfg = build_config(
        PrepareConfig,
        {
            "out_dir": str(data_dir / "prepared" / "bench-smollm2"),
            "tokenizer": {"path": str(model_dir)},
            "tasks": [
                {
                    "name": "en",
                    "train": [str(data_dir / "demo" / "en" / "train.jsonl")],
                    "val": [str(data_dir / "demo" / "en" / "val.jsonl")],
                }
            ],
        },
    )
    return prepare(cfg, progress=False)


def training(args, model_dir: Path, prepared: Path) -> tuple[list[float], list[float]]:
    tokens = args.steps * args.batch_size * args.seq_len
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config(
            RunConfig,
            {
                "run_dir": str(Path(tmp) / "run"),
                "model": {"init_from": str(model_dir)},
                "data": {"dir": str(prepared), "tasks": ["en"], "tokens_per_task": 10**9},
                "train": {
                    "seq_len": args.seq_len,
                    "batch_size": args.batch_size,
                    "precision": args.precision,
                    "lr": 1e-4,
                },
            },
        )
        trainer = Trainer(cfg, progress=False)
        trainer.start()
        shard = open_split(prepared, "en", "train")
        model = load_pretrained(model_dir)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), foreach=True)
        bf16 = args.precision == "bf16"
        window = args.seq_len + 1
        trainer.step(0)
        bare_loop(model, opt, shard, window, args.batch_size, 1, 0, bf16)
        ours, bare, pos = [], [], 1
        for r in range(args.rounds):
            for who in ("cptrain", "bare") if r % 2 == 0 else ("bare", "cptrain"):
                t0 = time.perf_counter()
                if who == "cptrain":
                    for _ in range(args.steps):
                        trainer.step(0)
                    ours.append(tokens / (time.perf_counter() - t0))
                else:
                    bare_loop(model, opt, shard, window, args.batch_size, args.steps, pos, bf16)
                    pos += args.steps
                    bare.append(tokens / (time.perf_counter() - t0))
        trainer.stop()
    return ours, bare


ANCHORS: dict[str, dict[str, Any]] = {
    "without": {},
    "kl": {"regularize": {"kl_to_start": {"weight": 1.0}}},
    "l2": {"regularize": {"l2_to_start": {"weight": 10.0}}},
}


def anchor_trainer(args, model_dir: Path, prepared: Path, name: str, root: Path) -> Trainer:
    cfg = build_config(RunConfig, {
        "run_dir": str(root / name),
        "model": {"init_from": str(model_dir)},
        # a budget of 1,000 steps: the sampler's index arrays grow with it, and a huge one
        # would set the peak memory that this bench compares
        "data": {"dir": str(prepared), "tasks": ["en"],
                 "tokens_per_task": 1000 * args.batch_size * args.seq_len},
        "train": {"seq_len": args.seq_len, "batch_size": args.batch_size,
                  "precision": args.precision, "lr": 1e-4},
        **ANCHORS[name],
    })
    trainer = Trainer(cfg, progress=False)
    trainer.start()
    return trainer


def anchor_speed(args, model_dir: Path, prepared: Path) -> dict[str, list[float]]:
    tokens = args.steps * args.batch_size * args.seq_len
    out: dict[str, list[float]] = {name: [] for name in ANCHORS}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {n: anchor_trainer(args, model_dir, prepared, n, Path(tmp)) for n in ANCHORS}
        for t in trainers.values():
            t.step(0)  # warm-up
        for r in range(args.rounds):
            for name in list(ANCHORS) if r % 2 == 0 else list(reversed(ANCHORS)):
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    trainers[name].step(0)
                out[name].append(tokens / (time.perf_counter() - t0))
        for t in trainers.values():
            t.stop()
    return out


def anchor_memory_child(args, model_dir: Path, prepared: Path, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = anchor_trainer(args, model_dir, prepared, name, Path(tmp))
        for _ in range(3):
            trainer.step(0)
        trainer.stop()
    # VmHWM, not ru_maxrss: the latter survives exec, so a child forked from this bench's
    # parent (which holds three runs) would report the parent's peak.
    status = Path("/proc/self/status").read_text().splitlines()
    hwm_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"max_rss_mib": hwm_kib / 1024}))


def anchors(args, model_dir: Path, prepared: Path) -> None:
    speed = anchor_speed(args, model_dir, prepared)
    print(f"SmolLM2-135M training with anchors to the start model, seq {args.seq_len}, batch "
          f"{args.batch_size}, {args.precision}, {args.threads} threads, {args.rounds} rounds x "
          f"{args.steps} steps")
    base = statistics.median(speed["without"])
    for name, vals in speed.items():
        med = statistics.median(vals)
        print(f"  {name:8s} median {med:7,.0f} tok/s  ({', '.join(f'{x:,.0f}' for x in vals)})"
              f"  ÷ without {med / base:.3f}")
    rss = {}
    for name in ANCHORS:
        argv = [sys.executable, __file__, "--anchor-memory", name, "--seq-len", str(args.seq_len),
                "--batch-size", str(args.batch_size), "--precision", args.precision,
                "--threads", str(args.threads), "--prepared", str(prepared)]
        done = subprocess.run(argv, capture_output=True, text=True, check=True)
        rss[name] = json.loads(done.stdout.strip().splitlines()[-1])["max_rss_mib"]
    for name, mib in rss.items():
        print(f"  {name:8s} peak RSS {mib:7,.0f} MiB  ÷ without {mib / rss['without']:.3f}")


def generation(args, model_dir: Path) -> tuple[list[float], list[float]]:
    model = load_pretrained(model_dir)
    model.eval()
    new = args.gen_len
    eos = model.config.eos_token_id
    bos = eos[0] if isinstance(eos, list) else eos
    ours, plain = [], []
    for r in range(args.gen_rounds):
        for who in ("cptrain", "plain") if r % 2 == 0 else ("plain", "cptrain"):
            t0 = time.perf_counter()
            if who == "cptrain":
                with tempfile.TemporaryDirectory() as tmp:
                    generate_rows(
                        model, tokens=args.gen_batch * new, row_len=new + 1,
                        batch_size=args.gen_batch, temperature=1.0, top_p=0.95, seed=r,
                        prompts=None, bos_id=bos, work_dir=Path(tmp), progress=False,
                        vocab_size=model.config.vocab_size,
                    )
                ours.append(args.gen_batch * new / (time.perf_counter() - t0))
            else:
                start = torch.full((args.gen_batch, 1), bos, dtype=torch.long)
                with torch.no_grad():
                    model.generate(
                        start, do_sample=True, temperature=1.0, top_p=0.95,
                        max_new_tokens=new, min_new_tokens=new, pad_token_id=bos,
                    )
                plain.append(args.gen_batch * new / (time.perf_counter() - t0))
    return ours, plain


def _ours(model, batch: int, new: int, seed: int, autocast) -> float:
    eos = model.config.eos_token_id
    bos = eos[0] if isinstance(eos, list) else eos
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        generate_rows(
            model, tokens=batch * new, row_len=new + 1, batch_size=batch, temperature=1.0,
            top_p=0.95, seed=seed, prompts=None, bos_id=bos, work_dir=Path(tmp), progress=False,
            vocab_size=model.config.vocab_size, autocast=autocast,
        )
    return batch * new / (time.perf_counter() - t0)


def _plain(model, batch: int, new: int, cache: str | None) -> float:
    eos = model.config.eos_token_id
    bos = eos[0] if isinstance(eos, list) else eos
    start = torch.full((batch, 1), bos, dtype=torch.long)
    extra = {"cache_implementation": cache} if cache else {}
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(start, do_sample=True, temperature=1.0, top_p=0.95, max_new_tokens=new,
                       min_new_tokens=new, pad_token_id=bos, **extra)
    return batch * new / (time.perf_counter() - t0)


def generation_options(args, model_dir: Path) -> None:
    model = load_pretrained(model_dir)
    model.eval()
    new = args.gen_len
    variants: dict[str, Any] = {}
    for b in (8, 16, 32, 64):
        variants[f"cptrain b{b} fp32"] = lambda r, b=b: _ours(model, b, new, r, None)
        variants[f"cptrain b{b} bf16"] = lambda r, b=b: _ours(model, b, new, r, torch.bfloat16)
    variants["generate b16 dynamic cache"] = lambda r: _plain(model, 16, new, None)
    variants["generate b16 static cache"] = lambda r: _plain(model, 16, new, "static")
    results: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.gen_rounds):
        names = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in names:
            try:
                results[name].append(variants[name](r))
            except Exception as exc:  # noqa: BLE001 - a variant this transformers lacks
                print(f"{name}: failed ({type(exc).__name__}: {str(exc)[:120]})")
                results[name].append(float("nan"))
    base = statistics.median(results["cptrain b16 fp32"])
    print(f"self-seed generation options, {new} new tokens per row, {args.gen_rounds} rounds")
    for name, vals in results.items():
        med = statistics.median(vals)
        print(f"  {name:28s} median {med:7,.0f} tok/s  ×{med / base:.2f} vs cptrain b16 fp32")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=3, help="steps per timed block")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--gen-batch", type=int, default=16)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--gen-rounds", type=int, default=4)
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--anchors", action="store_true",
                    help="only the KL and L2 anchors' tokens/s and peak memory ÷ without")
    ap.add_argument("--anchor-memory", choices=list(ANCHORS), help=argparse.SUPPRESS)
    ap.add_argument("--prepared", help=argparse.SUPPRESS)
    ap.add_argument("--gen-options", action="store_true",
                    help="only compare generation batch sizes, precisions and KV caches")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = fetch_model("smollm2-135m")
    if args.gen_options:
        generation_options(args, model_dir)
        return
    if args.anchor_memory:  # the parent prepared the data: its peak must not count here
        anchor_memory_child(args, model_dir, Path(args.prepared), args.anchor_memory)
        return
    prepared = prepared_english(Path(args.data_dir), model_dir)
    if args.anchors:
        anchors(args, model_dir, prepared)
        return

    ours, bare = training(args, model_dir, prepared)
    print(f"SmolLM2-135M training, seq {args.seq_len}, batch {args.batch_size}, {args.precision}, "
          f"{args.threads} threads, {args.rounds} rounds x {args.steps} steps")
    print(f"cptrain  median {statistics.median(ours):8,.0f} tok/s  ({', '.join(f'{x:,.0f}' for x in ours)})")  # noqa: E501
    print(f"bare     median {statistics.median(bare):8,.0f} tok/s  ({', '.join(f'{x:,.0f}' for x in bare)})")  # noqa: E501
    print(f"ratio cptrain/bare: {statistics.median(ours) / statistics.median(bare):.3f}")
    g_ours, g_plain = generation(args, model_dir)
    print(f"self-seed generation, batch {args.gen_batch}, {args.gen_len} new tokens")
    print(f"cptrain   median {statistics.median(g_ours):8,.0f} tok/s  ({', '.join(f'{x:,.0f}' for x in g_ours)})")  # noqa: E501
    print(f"generate  median {statistics.median(g_plain):8,.0f} tok/s  ({', '.join(f'{x:,.0f}' for x in g_plain)})")  # noqa: E501
    print(f"ratio cptrain/generate: {statistics.median(g_ours) / statistics.median(g_plain):.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
