"""The ``regularize:`` section of a run config: anchors to the start model (torch-free)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer
from pydantic_core import PydanticCustomError

from cptrain.config_base import StrictModel, without_unset

KLRows = Literal["all", "replay", "seed"]


class KLToStartConfig(StrictModel):
    """loss = CE + weight · KL(p_start ‖ p_θ), averaged over the tokens of the chosen rows.

    rows: all (every row of the batch), replay (the rows drawn from the buffer) or seed (the
    replayed rows that came from replay.seed: the proxy or self-generated stand-ins for the
    start model's own data). top_k: instead of running the start model at every step, keep its
    k most likely next tokens (ids and log-probabilities) with each seed row when the buffer is
    seeded; the KL is then taken over those k tokens plus one bucket for the rest (exact when k
    is the vocabulary). Needs rows: seed."""

    weight: float = Field(default=0.0, ge=0, description="λ of the KL term; 0 = off")
    rows: KLRows = Field(default="all", description="all | replay | seed")
    top_k: int | None = Field(default=None, ge=1, description="stored top-k targets; None: full")

    @model_serializer(mode="wrap")
    def _top_k_when_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        return without_unset(handler(self), "top_k")


class L2ToStartConfig(StrictModel):
    """After every optimizer step θ ← θ − lr · weight · (θ − θ_start), on the fp32 weights the
    optimizer steps (decoupled, as AdamW's weight decay is, but toward the start model)."""

    weight: float = Field(default=0.0, ge=0, description="λ of the pull; 0 = off")


class RegularizeConfig(StrictModel):
    kl_to_start: KLToStartConfig = KLToStartConfig()
    l2_to_start: L2ToStartConfig = L2ToStartConfig()

    @property
    def kl(self) -> bool:
        return self.kl_to_start.weight > 0

    @property
    def l2(self) -> bool:
        return self.l2_to_start.weight > 0


def check_anchors(cfg: RegularizeConfig, *, alpha: float, seeded: bool, peak_lr: float,
                  sharded: bool) -> None:
    """What the anchors need from the rest of a run config (called by RunConfig's validator)."""
    kl = cfg.kl_to_start
    if kl.top_k is not None and sharded:
        raise PydanticCustomError(
            "top_k_sharded", "regularize.kl_to_start.top_k computes its targets with the "
            "unsharded model; use distributed.strategy ddp or none, or drop top_k",
        )
    if kl.top_k is not None and (alpha == 0 or not seeded):
        raise PydanticCustomError(
            "top_k_without_buffer",
            "regularize.kl_to_start.top_k keeps the start model's targets with the replay "
            "buffer's seed rows, and this run has none; set replay.alpha > 0 and "
            "replay.seed, or drop top_k",
        )
    if kl.top_k is not None and kl.rows != "seed":
        raise PydanticCustomError(
            "top_k_rows", "stored top-k targets exist for seed rows only; set "
            "regularize.kl_to_start.rows: seed (or drop top_k for the full KL)",
        )
    if kl.weight > 0 and kl.rows != "all" and alpha == 0:
        raise PydanticCustomError(
            "kl_rows_absent", "regularize.kl_to_start.rows: {rows} needs replayed rows; set "
            "replay.alpha > 0 or rows: all", {"rows": kl.rows},
        )
    pull = cfg.l2_to_start.weight * peak_lr
    if pull > 1:
        raise PydanticCustomError(
            "l2_overshoots", "regularize.l2_to_start.weight × train.lr = {pull} > 1 pulls "
            "the weights past the start model every step; use a weight ≤ {most}",
            {"pull": f"{pull:g}", "most": f"{1 / peak_lr:g}"},
        )
    if kl.weight > 0 and kl.rows == "seed" and not seeded:
        raise PydanticCustomError(
            "kl_seed_absent", "regularize.kl_to_start.rows: seed needs replay.seed rows; "
            "add a replay.seed source or set rows: replay",
        )
