"""HST: Hierarchical Side-Tuning, a side network beside a frozen ViT, fed by meta tokens.

Lin et al., "Hierarchical Side-Tuning for Vision Transformers", arXiv 2310.05393
(AFeng-x/HST); docs/methods.md, "HST", has the formulas, the count and the deviations.

* **Meta tokens** (:class:`~.modules.MetaBlock`): one learnable token per ViT layer (Xavier
  uniform), prepended before the CLS token and read out after the block; the rest goes on
  without it. The ViT's block LayerNorms (norm1, norm2) train with the method.
* **Side network** (:class:`~.modules.HSTSide`): stages of side blocks, each stage fed by
  consecutive ViT layers, one block per layer (ViT-B: 4 stages, widths 32/48/64/72, heads
  2/4/8/12, layers 0–2, 3–5, 6–8, 9–11). Stage 1 starts from the image through a conv stem
  (conv3×3/2 without bias, BatchNorm, ReLU, conv2×2/2, LayerNorm: 224 px → 56×56); later
  stages from the previous one through conv3×3/2 + LayerNorm. Per stage one bridge
  ``Linear(D → w)`` maps both the layer's meta token (then its own LayerNorm per layer) and
  its patch features (bilinearly resized to the stage's grid, prefix and meta excluded).
* **Side block** (:class:`~.modules.SideBlock`): pre-LN cross-attention whose queries are
  the side tokens and whose keys/values are [meta token, mean of the bridged features],
  then the bridged features added, then an MLP (ratio 4); a final LayerNorm per stage.
* **Head**: the last stage's tokens mean-pooled, BatchNorm1d without affine, then the
  linear classifier on its 72 features; the ViT's final norm and CLS output go unused
  (:class:`~.method.HSTForward` is the model's forward).
* **Count** on ViT-B/16 (head excluded): **764,840** (+ 73·C for a C-class head).
* **Other backbones** (:mod:`.layout`): stages, grids, widths and the stem's stride are
  derived from the backbone's depth, patch grid and image size (embedded ViT: 3 stages
  fed by layers 0–1, 2–3, 4–5 on 16/8/4 grids, 48/64/72 wide).
* Not the identity at init (the head reads a new network) and not mergeable.

What a run stores beyond the weights (:mod:`.trace`): the meta tokens' norms per layer
(trained, at init, and their shift), the side layout, and on the test split the mean
meta-token and patch-token norms per layer, per-stage token-norm maps, each side block's
attention share on the meta token per head, and for the first test images their feature
maps (norms and principal components) and cross-attention weights per stage.
"""

from . import method, trace  # noqa: F401  (registration)
from .layout import SideLayout, Stage, side_layout
from .method import HST, HSTConfig, HSTForward, backbone_layout, hst_side, meta_blocks
from .modules import CrossAttention, HSTSide, MetaBlock, SideBlock, bridge_to_grid

__all__ = ["HST", "CrossAttention", "HSTConfig", "HSTForward", "HSTSide", "MetaBlock",
           "SideBlock", "SideLayout", "Stage", "backbone_layout", "bridge_to_grid", "hst_side",
           "meta_blocks", "side_layout"]
