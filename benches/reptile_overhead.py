"""What Reptile costs: optimizer-step throughput with and without it, and the anchor's memory.

Usage: PYTHONPATH=src python benches/reptile_overhead.py [--rounds 30] [--device cpu]

AdamW steps are timed alone (the part Reptile touches) in short blocks that alternate, in
rotating order, between no Reptile, no Reptile again (an A/A control that shows the noise),
Reptile k=500 and Reptile k=10, so that load from other processes hits every configuration
alike; ratios are medians over rounds of paired blocks, which resist such bursts.
Meta-updates are timed where they happen (inside the hook), and their median is amortized
over k: a 50-step block cannot hold a 500-step period, and a block median would hide it.
The same gradients are reused for every step: AdamW's work does not depend on their values.
A few full training steps (forward + backward + step) put the overhead in proportion.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cptrain.models.build import build_model, count_parameters
from cptrain.train.reptile import Reptile, ReptileConfig

MIB = 1024**2


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=500, help="the paper's meta-update period")
    ap.add_argument("--k-small", type=int, default=10, help="a short period, to show update cost")
    ap.add_argument("--block", type=int, default=50, help="optimizer steps per timed block")
    ap.add_argument("--rounds", type=int, default=30, help="rounds of alternating blocks")
    ap.add_argument("--full-steps", type=int, default=5, help="timed forward+backward+steps")
    ap.add_argument("--autocast", action="store_true", help="bf16 autocast for full steps")
    ap.add_argument("--device", default="cpu")
    return ap.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def loss_on(model, rows: torch.Tensor, autocast: bool) -> torch.Tensor:
    with torch.autocast(rows.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=rows[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))


def full_step_seconds(model, opt, rows, args, device) -> float:
    def step() -> None:
        loss_on(model, rows, args.autocast).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step()  # warm-up (allocations, autocast caches)
    times = []
    for _ in range(args.full_steps):
        opt.zero_grad(set_to_none=True)
        times.append(timed(step, device))
    return statistics.median(times)


class _Timed:
    """Reptile with its meta-updates timed in place, so blocks can report them separately."""

    def __init__(self, model, k: int, device: torch.device):
        self.reptile = Reptile(model.named_parameters(), ReptileConfig(enabled=True, k=k))
        self.update_times: list[float] = []
        update = self.reptile.meta_update

        def timed_update(optimizer=None) -> None:
            self.update_times.append(timed(lambda: update(optimizer), device))

        # The hook calls self.meta_update, so an instance attribute intercepts it.
        self.reptile.meta_update = timed_update  # type: ignore[method-assign]


BASE, CONTROL = "no reptile", "no reptile again"


def optimizer_blocks(model, opt, args, device) -> tuple[dict[str, list[float]], dict]:
    """Per config and round: seconds per step outside meta-updates; and the Reptile timers.

    The second no-Reptile configuration is an A/A control: its ratio to the first shows how
    much of any difference is noise from this machine.
    """
    timers = {f"reptile k={k}": _Timed(model, k, device) for k in (args.k, args.k_small)}
    names = [BASE, CONTROL, *timers]
    per_step: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.block):
        opt.step()  # warm-up

    def block() -> None:
        for _ in range(args.block):
            opt.step()

    for r in range(args.rounds):
        # Rotate the order so that no configuration always runs right after another.
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            tr = timers.get(name)
            before = sum(tr.update_times) if tr else 0.0
            if tr:
                tr.reptile.attach(opt)
            elapsed = timed(block, device)
            if tr:
                tr.reptile.detach()
            in_updates = (sum(tr.update_times) - before) if tr else 0.0
            per_step[name].append((elapsed - in_updates) / args.block)
    for tr in timers.values():
        while len(tr.update_times) < 3:  # a short run may not reach k: time a few directly
            tr.reptile.meta_update(opt)
    return per_step, timers


def amortized(per_step: list[float], tr: _Timed | None) -> tuple[list[float], float]:
    """Per-round seconds per step with the median meta-update spread over its period."""
    update = statistics.median(tr.update_times) if tr and tr.update_times else 0.0
    k = tr.reptile.cfg.k if tr else 1
    return [t + update / k for t in per_step], update


def report(per_step, timers, t_full: float, n_params: int, args) -> None:
    print(
        f"\nAdamW steps alone: {args.rounds} rounds of alternating {args.block}-step blocks; "
        "ratio = median over rounds of (time without / time with), meta-updates timed where "
        "they ran and amortized over k"
    )
    base = per_step[BASE]
    ratios = {}
    for name, times in per_step.items():
        tr = timers.get(name)
        with_upd, update = amortized(times, tr)
        ratios[name] = statistics.median(b / w for b, w in zip(base, with_upd, strict=True))
        n_upd = len(tr.update_times) if tr else 0
        print(
            f"  {name:17s} {statistics.median(times) * 1e3:6.3f} ms/step + meta-update "
            f"{update * 1e3:5.2f} ms ({n_upd:3d} timed) -> "
            f"{1 / statistics.median(with_upd):7.2f} steps/s, ratio {ratios[name]:.4f}"
        )
    print(f"\nfull training step ({t_full * 1e3:.0f} ms) plus the measured overhead:")
    for name, tr in timers.items():
        # The overhead that Reptile adds by construction: the hook (~0.1 us) + update / k.
        extra = statistics.median(tr.update_times) / tr.reptile.cfg.k
        print(f"  {name:17s} ratio {t_full / (t_full + extra):.5f} ({extra * 1e6:.1f} us/step)")
    anchor = timers[f"reptile k={args.k}"].reptile.anchor_bytes()
    print(
        f"\nanchor memory: {anchor / MIB:.1f} MiB fp32 = {anchor / (4 * n_params):.2f}x the "
        f"weights (weights + grads + AdamW moments: {16 * n_params / MIB:.1f} MiB)"
    )
    ratio = ratios[f"reptile k={args.k}"]
    noise = abs(1 - ratios[CONTROL])
    verdict = "meets" if ratio >= 0.995 else "MISSES"
    print(
        f"goal: steps/s with / without >= 0.995 at k={args.k}: {ratio:.4f} ({verdict} it; "
        f"A/A control differs by {noise:.4f})"
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(args.preset, args.vocab, seed=0, max_positions=args.seq).to(device)
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-6, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1
    )
    rows = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device)
    n_params = count_parameters(model)
    print(
        f"preset {args.preset}: {n_params / 1e6:.2f}M params, vocab {args.vocab}, seq {args.seq}, "
        f"batch {args.batch}, AdamW, {args.threads} threads, device {device}, "
        f"torch {torch.__version__}"
    )
    t_full = full_step_seconds(model, opt, rows, args, device)
    print(
        f"full training step (fwd+bwd+clip+AdamW{', bf16 autocast' if args.autocast else ''}): "
        f"{t_full * 1e3:.1f} ms (median of {args.full_steps})"
    )
    per_step, timers = optimizer_blocks(model, opt, args, device)
    report(per_step, timers, t_full, n_params, args)


if __name__ == "__main__":
    main()
