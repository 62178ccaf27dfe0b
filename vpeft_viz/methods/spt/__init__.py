"""SPT: Sensitivity-aware visual Parameter-efficient fine-Tuning (SPT-LoRA and SPT-Adapter).

He et al., ICCV 2023, https://arxiv.org/abs/2303.08566 (ziplab/SPT, ``engine.py``). Three steps:

1. **Sensitivity** (:func:`compute_sensitivity`). With a freshly initialised head
   (trunc-normal std 0.02 weight, zero bias) and the model in train mode with stochastic depth
   0.1 (linear over the blocks, so it is active), as in the release, accumulate the squared
   mini-batch gradient of every backbone weight, ``s += g²``, over the first
   ``batches × batch_size`` training images in file order (16 × 32 in the official code). By
   a first-order Taylor expansion the loss drop of one gradient step on a weight grows with
   g², so s ranks weights by how much tuning them alone would help. The head, CLS token,
   patch and position embeddings are not scored. timm's fused ``qkv`` is scored as three
   matrices q, k, v, as in the official code. The head init and drop-path are recorded in
   the method state (``sensitivity``).
2. **Allocation** (:func:`allocate`). Pool every score and keep the entries above a global
   threshold. A weight matrix with at least ``cost/α`` sensitive entries (α = 10) gets a
   structured module on the whole matrix (LoRA rank r: ``r·(in+out)``; adapter:
   ``2·out·r + r + out``); a bias/LayerNorm vector with at least ``dim/β`` (β = 5) is tuned
   whole; everything else tunes only its sensitive entries as a sparse delta. The budget is
   unstructured + structured + the CLS token (its width); the head is not counted. The
   threshold is searched so the budget used lands within 2% of the target; when no threshold
   can (a structured module jumps over it) the error names the nearest reachable budgets.
3. **Tuning**. Sparse deltas are 1-D parameters holding only the chosen entries, scattered
   into the frozen weight in forward (indices are buffers), so gradients exist only there.
   As in the release, sparse deltas live only in linear layers: the sensitive LayerNorm
   entries below the dim/β bar are counted in the budget but stay frozen (``budget.trained``
   in the state says what really trains; ``sparse_layernorm`` trains them too). A vector
   tuned whole, LayerNorm or bias, is trained. SPT-LoRA adds ``B·A·dropout(x)`` beside a
   matrix (no scaling, as in the official code); SPT-Adapter adds
   ``up(GELU(down(dropout(y))))`` to the matrix output y, sequentially, except on ``proj``,
   whose adapter runs in parallel on proj's input (the release's placement; same cost;
   ``proj_adapter`` switches it). proj's module gets the un-dropped input, every structured
   module's output passes through ``DropPath(0.1)`` (training only), and the adapter's
   down-projection bias keeps PyTorch's default init — all as released. SPT-LoRA merges
   exactly (sparse deltas, whole vectors, LoRA and the CLS delta all fold into plain
   weights); SPT-Adapter does not (GELU).

Where each step lives: :mod:`.scoring` (what is scored, step 1, on top of the gradient probe
in :mod:`vpeft_viz.probes.gradients`), :mod:`.allocation` (step 2), :mod:`.modules` (step 3),
:mod:`.records` (what a run stores for the views), :mod:`.methods` (the two registered
methods). :mod:`vpeft_viz.analysis.sensitivity` re-allocates stored records for the views.

Stored for the views (``artifacts``): per-weight scores would take 1.2M floats on the
embedded backbone (85M on ViT-B), so a run keeps instead (a) a *count table*: for ~1,500
global thresholds (geometric in the number of selected weights, < 1% apart) how many
weights of every matrix/vector are above it — enough to re-run the allocation at any budget
without the scores — and (b) every matrix's sensitivity as an image of at most 192 × 192
cells (mean-pooled), log10-quantised to uint8. About 0.5 MB per run on the embedded
backbone (1.8 MB on ViT-B); each run stays self-contained (no file shared between runs).
"""

from .allocation import (
    BUDGET_TOLERANCE,
    Allocation,
    BudgetError,
    SortedScores,
    allocate,
    allocation_costs,
    decode_indices,
    encode_indices,
)
from .methods import SPTAdapter, SPTAdapterConfig, SPTConfig, SPTLoRA, SPTLoRAConfig
from .modules import ClsTokenDelta, SPTLayerNorm, SPTLinear
from .records import (
    GRID_POINTS,
    IMAGE_MAX_SIDE,
    STATE_VERSION,
    allocation_arrays,
    allocation_state,
    sensitivity_summary,
)
from .scoring import (
    MATRIX_OPS,
    NORM_OPS,
    SensitivityInfo,
    Unit,
    cls_token_cost,
    compute_sensitivity,
    scored_units,
    set_stochastic_depth,
    structured_cost,
)

__all__ = [
    "BUDGET_TOLERANCE", "GRID_POINTS", "IMAGE_MAX_SIDE", "MATRIX_OPS", "NORM_OPS", "Allocation",
    "BudgetError", "ClsTokenDelta", "SPTAdapter", "SPTAdapterConfig", "SPTConfig", "SPTLayerNorm",
    "SPTLinear", "SPTLoRA", "SPTLoRAConfig", "STATE_VERSION", "SensitivityInfo", "SortedScores",
    "Unit", "allocate", "allocation_arrays", "allocation_costs", "allocation_state",
    "cls_token_cost", "compute_sensitivity", "decode_indices", "encode_indices", "scored_units",
    "sensitivity_summary", "set_stochastic_depth", "structured_cost",
]
