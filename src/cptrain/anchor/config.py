"""The ``regularize:`` section of a run config: anchors to the start model (torch-free)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer

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
