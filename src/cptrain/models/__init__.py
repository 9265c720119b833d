"""Released models cptrain can continue: a table of known ones (``registry``) and
``cptrain models fetch`` (``fetch``), which turns one into a Hugging Face directory for
``model.init_from``."""

from cptrain.models.fetch import fetch_model, verify_manifest
from cptrain.models.registry import KNOWN_MODELS, KnownModel, known_model

__all__ = ["KNOWN_MODELS", "KnownModel", "fetch_model", "known_model", "verify_manifest"]
