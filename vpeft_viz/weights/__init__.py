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

# The default live recipe's peak learning rate per method on the embedded backbone, chosen on
# the validation splits of the embedded suite for the shipped weights (MODEL_CARD.md, "How
# the live recipe was chosen"; `benchmarks/live_recipe.py`). A rate belongs to a backbone,
# not to a method: a 1.2 M-parameter ViT briefly distilled at 32 px wants larger steps than
# an ImageNet-21k ViT-B/16, so runs on any other backbone use the method's own
# ``default_lr`` (the common VTAB-1k AdamW rates). Resolved by ``PeftMethod.default_lr_on``.
EMBEDDED_LR: dict[str, float] = {
    # chosen on the plain mean of val200 accuracy over the 10 tasks of the default suite
    "linear": 0.3,  # 0.638 (0.1: 0.636, 0.03: 0.624, 0.01: 0.603)
    "full": 1e-3,  # 0.818 (3e-3: 0.730, 3e-4: 0.797, 1e-4: 0.714)
    "lora": 1e-2,  # 0.820 (3e-2: 0.662, 3e-3: 0.784, 1e-3: 0.670)
    "adaptformer": 3e-2,  # 0.783 (0.1: 0.765, 1e-2: 0.760, 3e-3: 0.683, 1e-3: 0.548)
    "ssf": 3e-2,  # 0.833 (0.1: 0.567, 1e-2: 0.817, 3e-3: 0.741, 1e-3: 0.636)
    "vpt-deep": 1e-2,  # 0.684 (1e-3: 0.527)
    # the PEFT family's first rate (1e-2), checked against 1e-3 on digits' val200: 1e-2
    # better for every one of them (MODEL_CARD.md, "How the live recipe was chosen"); not
    # tried above 1e-2, where AdaptFormer's and SSF's complete grids found their optimum
    "bitfit": 1e-2, "vpt-shallow": 1e-2, "spt-lora": 1e-2, "spt-adapter": 1e-2, "sct": 1e-2,
    "dyt": 1e-2, "e2vpt": 1e-2, "bi-adaptformer": 1e-2, "bi-lora": 1e-2, "velora": 1e-2,
    "hst": 1e-2,
    "pvp": 1e-2,  # VPT-deep's, as on other backbones (its prompts are VPT-deep's)
}


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
