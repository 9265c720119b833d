#!/usr/bin/env bash
# One-GPU check (≤ 8 minutes): the 560m preset with bf16 + FSDP2, replay 25% and Reptile, for a
# few hundred steps on the demo data; prints tokens/s, MFU against the card's bf16 peak,
# replay waits and peak memory. Needs data/prepared/demo (run `cptrain demo` or
# `cptrain prepare recipes/demo-prepare.yaml` first) and a CUDA build of torch.
#   bash benches/gpu_check.sh [steps]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-300}
PY=${PYTHON:-.venv/bin/python}
RUN=$(mktemp -d)/gpu-check
cat > "$RUN.yaml" <<YAML
run_dir: $RUN
method: mer
data: {dir: data/prepared/demo, tasks: [en, fr], tokens_per_task: $((STEPS * 32 * 1024 / 2))}
model: {preset: 560m}
train: {seq_len: 1024, batch_size: 32, micro_batch_size: 16, precision: bf16, log_every: 10}
eval: {windows: 16, batch_size: 16}
replay: {alpha: 0.25}
reptile: {enabled: true, k: 100, epsilon: 0.1}
distributed: {strategy: fsdp2}
YAML
timeout 480 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
  -m cptrain.cli train "$RUN.yaml" --no-progress
"$PY" - "$RUN" <<'PYEOF'
import json, sys
from pathlib import Path
import torch
from cptrain.models.build import PRESETS, build_model, count_parameters

run = Path(sys.argv[1])
recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
train = [r for r in recs if r["type"] == "train"][3:]  # skip warm-up
tps = sorted(r["tokens_per_s"] for r in train)[len(train) // 2]
s = PRESETS["560m"]
n = count_parameters(build_model("560m", 4096))
seq = 1024
flops_per_token = 6 * n + 12 * s.layers * s.hidden * seq  # weights + attention (fwd+bwd)
name = torch.cuda.get_device_name(0)
peaks = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
peak = next((v for k, v in peaks.items() if k in name), None)
print(f"device {name}; params {n / 1e6:.0f}M; median {tps:,.0f} tokens/s")
if peak:
    print(f"MFU {tps * flops_per_token / peak:.1%} of {peak / 1e12:.0f} TFLOP/s bf16 dense")
waits = max(r.get("buffer_prefetch_waits", 0) for r in train)
print(f"replay prefetch waits: {waits}")
print(f"peak memory: {max(r.get('cuda_max_mem_gb', 0) for r in train):.1f} GiB")
PYEOF
