"""The shipped weights of the embedded backbone: where they are and which they are.

No torch here (the Compare page reads run records without it). Recipe, data and measured
tables: ``MODEL_CARD.md`` beside this file; building the model: :mod:`vpeft_viz.backbones`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

EMBEDDED_BACKBONE = "vit_tiny_patch4_32_vpeft"
WEIGHTS_DIR = Path(__file__).parent
EMBEDDED_WEIGHTS = WEIGHTS_DIR / f"{EMBEDDED_BACKBONE}.safetensors"

# Every run records which backbone weights it was trained on (``backbone.weights`` in
# config.json, docs/run-store.md): a run's stored trainable weights only make sense on top of
# the same frozen backbone. Runs made before the record existed used the first (and until
# then only) embedded weights file, whose fingerprint this is.
EMBEDDED_WEIGHTS_V1 = "sha256:7b87374f3a0c603d"


def recorded_weights_id(backbone: Mapping[str, Any]) -> str | None:
    """The weights a stored run's ``backbone`` entry says it used; runs made before the
    record existed used :data:`EMBEDDED_WEIGHTS_V1` when on the embedded default, and are
    unknown (None) on a local checkpoint."""
    if "weights" in backbone:
        return backbone["weights"]
    if (backbone.get("pretrained") and not backbone.get("checkpoint")
            and backbone.get("name") == EMBEDDED_BACKBONE):
        return EMBEDDED_WEIGHTS_V1
    return None
