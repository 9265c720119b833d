"""The Hugging Face model card (``README.md``) of exported weights: YAML front matter
(library, base model, licence, tags), then what the weights are, the data, the method and the
loss matrix so far.

A card is a report on one run, written from JSON alone (the run's resolved config and the
trainer's counters, as a checkpoint's ``state.json`` holds them), so it needs neither torch nor
the trainer: ``cptrain.checkpoint.export`` writes it beside the weights.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cptrain.config import RunConfig
from cptrain.config_base import build_config
from cptrain.errors import CptrainError
from cptrain.evaluation import metrics
from cptrain.models.presets import DEFAULT_LR
from cptrain.models.registry import FORMAT, KNOWN_MODELS, MANIFEST
from cptrain.replay.mixer import mix_counts
from cptrain.report.tables import loss_matrix_table, metrics_line

CARD = "README.md"
_FULL_PRECISION = {"F32", "F16", "BF16", "F64"}


def model_card(config: dict[str, Any], trainer_state: dict[str, Any]) -> str:
    """The Hugging Face model card of a run's weights: YAML front matter (library, base model,
    licence, tags), then what the weights are, the data, the method and the loss matrix so far.

    ``config`` is the run's resolved config (JSON) and ``trainer_state`` the trainer's counters
    (``TrainerState.state_dict()``), as a checkpoint's ``state.json`` holds them, so the weights
    after a task and ``cptrain export`` of that task's checkpoint get the same card."""
    data = config.get("data", {})
    tasks = [t["name"] for t in data.get("tasks", [])]
    base = base_model_facts(config.get("model", {}).get("init_from"))
    front: dict[str, Any] = {"library_name": "transformers"}
    if base.get("base_model"):
        front["base_model"] = base["base_model"]
    if base.get("license"):
        front["license"] = str(base["license"]).lower()
    front["tags"] = ["cptrain", "continual-pretraining"]
    front["pipeline_tag"] = "text-generation"
    parts = [
        "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---",
        *_card_weights(config, trainer_state, tasks, base),
        *_card_data(config, trainer_state, tasks),
        *_card_method(config),
        *_card_losses(config, trainer_state, tasks),
    ]
    return "\n\n".join(parts) + "\n"


def _card_weights(
    config: dict[str, Any], st: dict[str, Any], tasks: list[str], base: dict[str, Any]
) -> list[str]:
    run = Path(str(config.get("run_dir", "run"))).name
    done = len(st.get("loss_matrix", []))
    idx, task_step, step = st.get("task_idx", done), st.get("task_step", 0), st.get("step", 0)
    if done and (idx < done or task_step == 0):  # right after task done-1 (and its evaluation)
        title = f"# {run}: after task {done} of {len(tasks)} ({tasks[done - 1]})"
        what = f"the weights after training task {done} of {len(tasks)}, `{tasks[done - 1]}`"
    else:
        current = tasks[min(idx, len(tasks) - 1)] if tasks else "?"
        title = f"# {run}: inside task {idx + 1} of {len(tasks)} ({current})"
        what = f"the weights {task_step} steps into task {idx + 1} of {len(tasks)}, `{current}`"
    run_id = f" (run id `{st['run_id']}`)" if st.get("run_id") else ""
    lines = [
        f"These are {what}, at optimizer step {step}, of the cptrain continual pre-training run "
        f"`{run}`{run_id}. Load them with `AutoModelForCausalLM.from_pretrained` (or "
        "`lm_eval --model hf`)."
    ]
    if base.get("base_model"):
        about = ", ".join(str(base[k]) for k in ("title", "license") if base.get(k))
        lines.append(
            f"Training started from `{base['base_model']}`"
            + (f" ({about})" if about else "")
            + " (`model.init_from`)."
        )
    else:
        preset = config.get("model", {}).get("preset", "tiny")
        lines.append(
            f"Training started from a freshly initialised `{preset}` model (seed "
            f"{config.get('seed', 0)})."
        )
    if base.get("note"):
        lines.append(
            f"> **Note:** the base weights come from a quantized GGUF file and were {base['note']}."
        )
    if base.get("dtype"):
        lines.append(
            f"> **Note:** these weights are float32 (the optimizer's master weights); the base "
            f"model's were {base['dtype']}, half the size. `torch_dtype={base['dtype']}` in "
            "`from_pretrained` loads them as the base was."
        )
    return [title, "\n\n".join(lines)]


@dataclass(frozen=True)
class _Batches:
    """What the card shows of the trainer's batch plan (``train.batches.BatchPlan``)."""

    n_fresh: int  # fresh rows per optimizer step
    n_replay: int  # replayed rows per step once the buffer holds them
    task_steps: tuple[int, ...]


def _batches(config: dict[str, Any]) -> _Batches | None:
    """Rows per step and steps per task of this config, by the trainer's rules: rows split by
    ``mix_counts``, a task's token budget over the tokens of a batch, rounded up. None for a
    config this version refuses or one that leaves no fresh row (the trainer would not run it)."""
    try:
        cfg = build_config(RunConfig, config)
        n_fresh, n_replay = mix_counts(cfg.replay.alpha, cfg.train.batch_size, cfg.replay.mode)
    except CptrainError:
        return None
    if n_fresh == 0:
        return None
    return _Batches(n_fresh, n_replay, cfg.task_steps)


def _card_data(config: dict[str, Any], st: dict[str, Any], tasks: list[str]) -> list[str]:
    data, train = config.get("data", {}), config.get("train", {})
    plan = _batches(config)
    done, idx = len(st.get("loss_matrix", [])), st.get("task_idx", 0)
    rows = ["| # | task | token budget | steps | trained |", "|---|---|---|---|---|"]
    for i, spec in enumerate(data.get("tasks", [])):
        budget = spec.get("tokens") or data.get("tokens_per_task")
        steps = f"{plan.task_steps[i]:,}" if plan else "–"
        partly = i == idx and st.get("task_step", 0) > 0
        trained = "yes" if i < done else ("partly" if partly else "not yet")
        rows.append(f"| {i + 1} | `{spec['name']}` | {budget:,} | {steps} | {trained} |")
    batch, seq_len = train.get("batch_size"), train.get("seq_len")
    per_step = f"{batch} sequences of {seq_len} tokens per optimizer step"
    if plan and plan.n_replay:
        per_step += f" ({plan.n_fresh} fresh + {plan.n_replay} replayed once the buffer holds them)"
    lines = [
        "## Data",
        f"Prepared data `{data.get('dir')}`, tasks trained in this order; {per_step}. A task "
        "trains for its token budget divided by the tokens of a batch, rounded up:",
        "\n".join(rows),
        f"Tokens trained so far: {st.get('fresh_tokens', 0):,} fresh, "
        f"{st.get('replay_tokens', 0):,} replayed.",
    ]
    if data.get("eval_only"):
        names = ", ".join(f"`{t}`" for t in data["eval_only"])
        lines.append(f"Evaluated at every evaluation but never trained: {names}.")
    return ["\n\n".join(lines)]


def _card_method(config: dict[str, Any]) -> list[str]:
    replay, reptile, train = (config.get(k, {}) for k in ("replay", "reptile", "train"))
    alpha = float(replay.get("alpha", 0.0))
    lines = [f"- method: `{config.get('method') or 'custom'}`"]
    if alpha > 0:
        lines.append(
            f"- experience replay: α = {alpha:g} ({replay.get('mode', 'substitute')}; buffer "
            f"policy {replay.get('policy', 'all')}, replay from {replay.get('replay_from', 'all')})"
        )
    else:
        lines.append("- experience replay: none (α = 0)")
    for src in replay.get("seed") or []:  # rows in the buffer before the first task
        what = f"`{src.get('task')}`" if src.get("source") == "task" else (
            f"text sampled from the starting model (temperature {src.get('temperature')}, "
            f"top_p {src.get('top_p')})")
        lines.append(f"- replay seed: {src.get('tokens'):,} tokens of {what}")
    if reptile.get("enabled"):
        lines.append(
            f"- Reptile: k = {reptile.get('k')}, ε = {reptile.get('epsilon')} "
            "(every k steps θ ← θ₀ + ε(θ − θ₀))"
        )
    else:
        lines.append("- Reptile: off")
    lr = train.get("lr") or DEFAULT_LR.get(config.get("model", {}).get("preset", ""), math.nan)
    lines.append(
        f"- AdamW, peak learning rate {lr:g}, {train.get('schedule', 'cosine')} schedule, "
        f"seed {config.get('seed', 0)}"
    )
    return ["## Method\n\n" + "\n".join(lines)]


def _card_losses(config: dict[str, Any], st: dict[str, Any], tasks: list[str]) -> list[str]:
    eval_only = list(config.get("data", {}).get("eval_only", []))
    columns = [*tasks, *eval_only]
    matrix = st.get("loss_matrix", [])
    before = st.get("loss_before") or []
    if not matrix and not before:
        return []
    table = loss_matrix_table(
        tasks,
        matrix,
        eval_only=eval_only,
        before=dict(zip(columns, before, strict=False)) or None,
    )
    if matrix:
        periodic = metrics.evaluations_from_history(st.get("eval_history", []))
        found = metrics.summarize(matrix, periodic)
        if eval_only and len(before) == len(columns):  # what the base knew, kept or lost
            found["eval_only_forgetting"] = metrics.forgetting_since_start(
                matrix, before, tasks, eval_only)
        table += "\n" + metrics_line(found)
    return [
        "## Loss matrix\n\nValidation loss (nats per token) on held-out windows of each task: "
        "row `before` is the starting model, row *t* the weights after task *t*.\n\n"
        f"```text\n{table}\n```"
    ]


def base_model_facts(init_from: str | None) -> dict[str, Any]:
    """What a card says of ``model.init_from``: ``base_model`` (the registry name of a model
    ``cptrain models fetch`` wrote, else the path), ``title``, ``license`` and a ``note`` when
    the weights were dequantized from a quantized GGUF."""
    if not init_from:
        return {}
    path = Path(init_from)
    facts: dict[str, Any] = {"base_model": str(init_from)}
    if path.is_dir():
        manifest = _read_json(path / MANIFEST)
        if manifest.get("format") == FORMAT:
            quant = str((manifest.get("source") or {}).get("quantization", ""))
            known = KNOWN_MODELS.get(str(manifest.get("name")))
            facts.update(
                # the Hub id where one is known: what the Hub links a card's base_model to
                base_model=(known.hub_id if known and known.hub_id else None)
                or manifest.get("name") or str(init_from),
                title=manifest.get("model"),
                license=manifest.get("license"),
                note=manifest.get("note") if quant not in _FULL_PRECISION else None,
            )
            return facts
        config = _read_json(path / "config.json")
        facts["license"] = _front_matter(path / CARD).get("license") or config.get("license")
        dtype = config.get("dtype") or config.get("torch_dtype")
        if dtype in ("bfloat16", "float16"):
            facts["dtype"] = dtype
    elif path.is_file():
        facts.update(_gguf_facts(path))
    return facts


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _front_matter(path: Path) -> dict[str, Any]:
    """The YAML front matter of a model card (``---`` … ``---``), if any."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---"):
        return {}
    head = text[3:].split("\n---", 1)[0]
    try:
        value = yaml.safe_load(head)
    except yaml.YAMLError:
        return {}
    return value if isinstance(value, dict) else {}


def _gguf_facts(path: Path) -> dict[str, Any]:
    """Licence and weight types of a GGUF file, from its header (no tensor data is read)."""
    try:
        import gguf  # optional: only a .gguf base model needs it

        reader = gguf.GGUFReader(str(path))
    except Exception:  # noqa: BLE001 - an unreadable file just says less on the card
        return {}
    facts: dict[str, Any] = {}
    field = reader.fields.get("general.license")
    if field is not None:
        with contextlib.suppress(Exception):
            facts["license"] = str(field.contents())
    types = sorted({t.tensor_type.name for t in reader.tensors} - _FULL_PRECISION)
    if types:
        facts["note"] = f"dequantized from {', '.join(types)}: weights carry its quantization noise"
    return facts
