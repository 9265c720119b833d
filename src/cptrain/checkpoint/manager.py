"""CheckpointManager: save and restore every stateful part of a run as one moment.

Components own their state (``state_dict()`` / ``load_state_dict()``); the manager owns the
policy (when, where, how many to keep) and the format: single-process checkpoints are
safetensors + JSON (``local``), torchrun ones DCP shards plus a gathered model (``sharded``).
Build every component first, register it, then ``restore()`` loads state into the live objects.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch

from cptrain.checkpoint import compat, local, sharded
from cptrain.distributed import DistEnv
from cptrain.errors import CheckpointError
from cptrain.rundir.layout import no_checkpoint


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """``load_state_dict`` that accepts what ``save_pretrained`` leaves out: the second name of
    a tied weight (e.g. ``lm_head.weight`` of a model with tied embeddings)."""
    own = model.state_dict()
    for name, tensor in weights.items():
        if name in own and tuple(own[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"checkpoint {source}: {name} has shape {tuple(tensor.shape)}, the model's "
                f"{tuple(own[name].shape)}; it was saved for another model: resume with the "
                "config it was written with"
            )
    missing, unexpected = model.load_state_dict(weights, strict=False)
    groups: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), set()).add(name)
    loaded = set(weights)
    bad = [k for k in missing if not any(loaded & g for g in groups.values() if k in g)]
    if bad or unexpected:
        what = f"lacks {bad[0]}" if bad else f"has unknown {unexpected[0]}"
        raise CheckpointError(
            f"checkpoint {source}: the model {what} ({len(bad)} missing, {len(unexpected)} "
            "unknown); it was saved for another model: resume with the config it was written with"
        )


class CheckpointManager:
    def __init__(
        self,
        root: Path,
        env: DistEnv,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        tokenizer_dir: Path | None,
        keep_last: int,
        every: int = 0,
    ) -> None:
        self.root = Path(root)
        self.env = env
        self.model = model
        self.optimizer = optimizer
        self.tokenizer_dir = tokenizer_dir
        self.keep_last = keep_last
        self.every = every
        self.last_step: int | None = None  # the step of the newest checkpoint written here
        self.meta: dict[str, Any] = {}  # plain facts saved with every checkpoint (config, …)
        self._states: dict[str, Stateful] = {}  # the same on every rank: saved once
        self._rank_states: dict[str, Stateful] = {}  # each rank's own (its replay shard)
        self._required: set[str] = set()

    def register(
        self, name: str, component: Stateful, *, per_rank: bool = False, required: bool = False
    ) -> None:
        """``required``: a checkpoint without this component's state cannot be resumed (the
        component's ``load_state_dict(None)`` says why); others start fresh when absent."""
        if name in self._states or name in self._rank_states or name in self.meta:
            raise ValueError(f"checkpoint component {name!r} registered twice")
        (self._rank_states if per_rank else self._states)[name] = component
        if required:
            self._required.add(name)

    def should_save(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    # ------------------------------------------------------------------ finding
    def latest(self) -> Path:
        """The newest complete checkpoint (damaged ones are skipped, and said so)."""
        found = None
        if self.env.is_main:
            path, skipped = local.latest_complete(self.root)
            for reason in skipped:
                print(f"skipping damaged or incomplete checkpoint {reason}")
            found = str(path) if path is not None else None
        found = self.env.broadcast_object(found)
        if found is None:
            raise no_checkpoint(self.root)
        return Path(found)

    @staticmethod
    def header(path: Path) -> dict[str, Any]:
        """state.json of a checkpoint ``latest()`` verified: what it is, before anything is
        loaded from it."""
        try:
            state = json.loads((Path(path) / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise CheckpointError(
                f"checkpoint {path}: state.json is unreadable; resume from an older one"
            ) from None
        found = state.get("format") if isinstance(state, dict) else None
        if found != local.FORMAT:
            raise CheckpointError(f"checkpoint {path}: unknown format {found!r}")
        return state

    def resume_point(
        self,
        *,
        config: dict[str, Any],
        model_vocab: int,
        identity: dict[str, str],
        data_dir: Path | str,
        allow_config_change: bool = False,
    ) -> tuple[Path, dict[str, Any]]:
        """The newest complete checkpoint and its state.json, once this run may resume it."""
        path = self.latest()
        state = self.header(path)
        compat.check_resume(
            path,
            state,
            config=config,
            world_size=self.env.world_size,
            distributed=self.env.active,
            model_vocab=model_vocab,
            checkpoint_vocab=self.model_vocab(path),
            identity=identity,
            data_dir=data_dir,
            allow_config_change=allow_config_change,
        )
        if self.env.is_main:
            # Only once the resume is accepted: a refused one (another config, its keep_last
            # among it) must leave every checkpoint where it was. Temporary directories of
            # saves that a kill interrupted go now; a resume of a run that had already
            # finished would otherwise never save (and prune) again.
            local.prune(self.root, self.keep_last, protect=path)
        return path, state

    @staticmethod
    def model_vocab(path: Path) -> int:
        """Embedding rows of a checkpoint's model (from its Hugging Face config)."""
        try:
            return int(json.loads((Path(path) / "model" / "config.json").read_text())["vocab_size"])
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(
                f"checkpoint {path}: model/config.json is unreadable; resume from an older one"
            ) from None

    # ------------------------------------------------------------------ saving
    def save(self, step: int) -> Path:
        self.last_step = step
        state: dict[str, Any] = {**self.meta, "world_size": self.env.world_size}
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        sharded_run = self.env.active
        for name, component in self._states.items():
            state[name], tensors[name] = local.split_state(
                component.state_dict(), name, to_cpu=not sharded_run
            )
        rank_state: dict[str, Any] = {}
        for name, component in self._rank_states.items():
            rank_state[name], rank_tensors = local.split_state(component.state_dict(), name)
            if rank_tensors:
                raise TypeError(f"per-rank component {name!r} must hold no tensors")
        if sharded_run:
            return sharded.save(
                self.root,
                step,
                self.env,
                model=self.model,
                optimizer=self.optimizer,
                tokenizer_dir=self.tokenizer_dir,
                state=state,
                rank_state=rank_state,
                tensors=tensors,
                keep_last=self.keep_last,
            )
        state.update(rank_state)
        return local.save_checkpoint(
            self.root,
            step,
            model=self.model,
            tokenizer_dir=self.tokenizer_dir,
            optimizer=self.optimizer,
            state=state,
            tensors={k: v for k, v in tensors.items() if v},
            keep_last=self.keep_last,
        )

    # ------------------------------------------------------------------ restoring
    def restore(self, path: Path) -> None:
        """Load weights, optimizer, RNG and every registered component from ``path``."""
        saved = self._restore_sharded(path) if self.env.active else self._restore_local(path)
        for name, component in {**self._states, **self._rank_states}.items():
            state = saved.get(name)
            if state is not None or name in self._required:
                component.load_state_dict(state)

    def _restore_local(self, path: Path) -> dict[str, Any]:
        c = local.load_checkpoint(path)
        load_weights(self.model, c.model_state(), path)
        blob = c.optimizer_blob()
        self.optimizer.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["rng_cpu"])
        return {name: c.component(name) for name in {**self._states, **self._rank_states}}

    def _restore_sharded(self, path: Path) -> dict[str, Any]:
        templates = {
            name: local.split_state(component.state_dict(), name, to_cpu=False)[1]
            for name, component in self._states.items()
        }
        state, loaded = sharded.load(
            path, model=self.model, optimizer=self.optimizer, templates=templates
        )
        out = {
            name: local.join_state(state[name], loaded.get(name, {}))
            for name in self._states
            if state.get(name) is not None
        }
        mine = state["ranks"][self.env.rank]
        out.update({name: mine.get(name) for name in self._rank_states})
        return out
