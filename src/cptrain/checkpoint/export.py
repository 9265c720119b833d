"""The one Hugging Face export: a ``from_pretrained`` directory of a model's full weights.

Used for the model inside every checkpoint, for ``models/after_<i>_<task>/`` and for
``cptrain export``. Under torchrun the full weights are gathered onto rank 0, which writes.
The exported directories (not the checkpoints' own ``model/``) carry a Hugging Face model card,
``README.md``, written in the same temporary directory as the weights (``model_card``).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from cptrain import fsutil
from cptrain.distributed import DistEnv


def copy_tokenizer(tokenizer_dir: Path | None, out: Path) -> None:
    if tokenizer_dir is None:
        return
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            shutil.copy2(f, Path(out) / f.name)


def full_state_dict(model: torch.nn.Module, env: DistEnv) -> dict[str, torch.Tensor] | None:
    """The gathered weights under torchrun (collective: every rank calls it), else None."""
    if not env.active:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def write_model_dir(
    model: torch.nn.Module,
    out: Path,
    tokenizer_dir: Path | None,
    full: dict[str, torch.Tensor] | None = None,
) -> None:
    """Weights (safetensors), config and tokenizer files into the new directory ``out``.

    ``full`` is the gathered state of a sharded model; without it the module saves itself
    (``save_pretrained`` keeps tied embeddings tied)."""
    out = Path(out)
    if full is None:
        model.save_pretrained(out, safe_serialization=True)
    else:
        out.mkdir(parents=True)
        tensors = {k: v.contiguous() for k, v in full.items()}
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        # What save_pretrained would have written: the class to load (fully_shard renames it
        # FSDP<class>), the weights' dtype and the generation defaults (EOS to stop at).
        config = model.config  # type: ignore[attr-defined]
        name = type(model).__name__.removeprefix("FSDP")
        config.architectures = config.architectures or [name]
        config.dtype = next(iter(tensors.values())).dtype
        config.save_pretrained(out)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(out)
    copy_tokenizer(tokenizer_dir, out)
    for f in out.iterdir():
        # safetensors writes its file 0600: another user or a serving container could not
        # read the weights beside a 0644 config.
        if f.is_file():
            f.chmod(0o644)


def export_model(
    model: torch.nn.Module,
    env: DistEnv,
    out: Path,
    tokenizer_dir: Path | None,
    card: str | None = None,
    base: str | None = None,
) -> None:
    """Write ``out`` atomically (temp sibling, then rename over any old copy); collective.
    ``card``, when given, becomes its ``README.md``; ``base`` (``model.init_from``) gives its
    licence files."""
    full = full_state_dict(model, env)
    if env.is_main:
        with fsutil.built_dir(out, what=f"exporting {out}",
                              fix="free space, then resume with --resume") as tmp:
            write_model_dir(model, tmp, tokenizer_dir, full)
            if card is not None:
                fsutil.atomic_write_text(tmp / CARD, card)
            copy_base_licence(base, tmp)
    env.barrier()


_LICENCE_FILES = ("LICENSE*", "LICENCE*", "NOTICE*", "COPYING*")


def copy_base_licence(base: str | None, out: Path) -> None:
    """The base model's licence files beside weights derived from it (its licence asks for
    them to travel with the weights); nothing for a fresh model or a .gguf file."""
    if not base or not Path(base).is_dir():
        return
    for pattern in _LICENCE_FILES:
        for f in sorted(Path(base).glob(pattern)):
            if f.is_file() and not (Path(out) / f.name).exists():
                shutil.copy2(f, Path(out) / f.name)
                (Path(out) / f.name).chmod(0o644)


def export_checkpoint(path: Path, out: Path) -> None:
    """Copy the model of checkpoint ``path`` (already a Hugging Face directory) to ``out``,
    with the model card of those weights (from the checkpoint's config and trainer state)."""
    out = Path(out)
    state: Any = None
    with contextlib.suppress(OSError, ValueError):
        state = json.loads((Path(path) / "state.json").read_text(encoding="utf-8"))
    card = None
    if isinstance(state, dict) and isinstance(state.get("config"), dict):
        card = model_card(state["config"], state.get("trainer") or {})
    with fsutil.built_dir(out, what=f"exporting {out}", fix="free space and run it again") as tmp:
        shutil.copytree(Path(path) / "model", tmp)
        if card is not None:
            fsutil.atomic_write_text(tmp / CARD, card)
            copy_base_licence(state["config"].get("model", {}).get("init_from"), tmp)


# --------------------------------------------------------------------------- model cards
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


def _plan(config: dict[str, Any]) -> Any:
    """The trainer's ``BatchPlan`` of this config (None for a config this version refuses)."""
    from cptrain.config import RunConfig
    from cptrain.config_base import build_config
    from cptrain.errors import CptrainError
    from cptrain.train.batches import BatchPlan

    try:
        return BatchPlan.build(build_config(RunConfig, config), 1, 0)
    except CptrainError:
        return None


def _card_data(config: dict[str, Any], st: dict[str, Any], tasks: list[str]) -> list[str]:
    data, train = config.get("data", {}), config.get("train", {})
    plan = _plan(config)
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
    from cptrain.models.presets import DEFAULT_LR

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
    from cptrain.evaluation import metrics
    from cptrain.report.tables import loss_matrix_table, metrics_line

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
        from cptrain.models.fetch import FORMAT, MANIFEST

        manifest = _read_json(path / MANIFEST)
        if manifest.get("format") == FORMAT:
            from cptrain.models.registry import KNOWN_MODELS

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
        import gguf

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
