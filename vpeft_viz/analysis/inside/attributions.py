"""Attributions of one test image for a trained run, with captum, and how far to trust them.

For a target class t (the run's prediction, or the true class) of an image x:

* **Integrated Gradients on the input** (Sundararajan et al., 2017,
  https://arxiv.org/abs/1703.01365; captum ``IntegratedGradients``): the gradient of logit t
  integrated along the straight path from a baseline image to x, times (x − baseline),
  summed over the colour channels into one signed value per pixel. *Completeness*: the
  attributions sum to logit_t(x) − logit_t(baseline); captum's convergence delta is the
  quadrature's error in that sum. The integral uses Gauss–Legendre nodes
  (:attr:`AttributionSettings.steps`), all in one batched forward/backward pass, doubled
  while the delta is above :attr:`AttributionSettings.tolerance` of the logit difference.
* **Layer Integrated Gradients on the patch tokens**: the same integral for the network
  above a block (:func:`vpeft_viz.probes.representations.forward_above`), along the straight
  path between the token sequences the baseline and x produce at that block's input — what
  captum's ``LayerIntegratedGradients`` computes (tested equal), without re-running the
  blocks below at every step. Summed over the width: one value per token; the patch tokens
  are laid out on the patch grid, the CLS and prompt tokens' shares are reported.
* **Attention rollout** (:func:`vpeft_viz.probes.attention.cls_rollout`): the non-gradient
  reference, from the attention maps alone.

Trust, with captum's metrics (Yeh et al., 2019, https://arxiv.org/abs/1901.09392):
*infidelity* (``captum.metrics.infidelity``, normalised: the attributions are rescaled by the
best factor first) is the mean squared error between the attributions summed over a
perturbation and the logit change it causes. The perturbations ask what a map is read for —
what happens when these regions are gone: random patches (tokens, for the layer map), each
with probability :attr:`AttributionSettings.removal`, are set to the baseline. It is also
given relative to the mean squared logit change of the same perturbations (0: the map
predicts every change; 1: no better than predicting none). *Max-sensitivity*
(``captum.metrics.sensitivity_max``): the largest change of the map, relative to its norm,
under uniform input noise of radius :attr:`AttributionSettings.radius` × the input's
standard deviation.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import records

BASELINES = {"mean": "uniform image at the normalisation mean (zero input)",
              "black": "black image"}
TARGETS = {"predicted": "each run's prediction", "true": "the true class"}
# Rough bytes of activations kept for the backward pass, per image and per token·width·block.
_BACKWARD_BYTES = 4 * 24
_PASS_BUDGET_BYTES = 2 * 10**9


@dataclass
class AttributionSettings:
    """How an image's attributions are computed (stored with them; others recompute)."""

    steps: int = 16  # Gauss–Legendre nodes of the path integrals, first try
    max_steps: int = 64  # doubled up to this while the convergence delta is too large
    tolerance: float = 0.01  # acceptable |delta|, × |logit(image) − logit(baseline)|
    block: int | None = None  # layer IG at this block's input (1..depth-1); None: the last
    baseline: str = "mean"  # see BASELINES
    target: str = "predicted"  # see TARGETS
    infidelity_samples: int = 32  # perturbed copies of the input for infidelity
    removal: float = 0.25  # infidelity: share of patches (tokens) set to the baseline
    sensitivity_samples: int = 3  # perturbed inputs for max-sensitivity
    radius: float = 0.02  # sensitivity noise radius (L∞), × the input's std
    seed: int = 0  # the metrics' noise

    def __post_init__(self) -> None:
        if not 2 <= self.steps <= self.max_steps:
            raise ValueError(f"steps must be at least 2 and at most max_steps "
                             f"({self.max_steps}); got {self.steps}")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {', '.join(BASELINES)}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}")
        if not 0 < self.removal < 1:
            raise ValueError(f"removal must be in (0, 1); got {self.removal}")
        if self.infidelity_samples < 2:
            raise ValueError("infidelity_samples must be at least 2")

    def key(self) -> dict[str, Any]:
        return asdict(self)


def baseline_image(image, mean, std, kind: str):
    """The baseline input in normalised space: zeros (the mean colour) or black pixels."""
    import torch

    if kind == "mean":
        return torch.zeros_like(image)
    m = torch.tensor(mean, dtype=image.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=image.dtype).view(1, -1, 1, 1)
    return ((0 - m) / s).expand_as(image).clone()


def _per_pass(model, tokens: int) -> int:
    """Images per batched forward/backward pass that fit the memory budget."""
    per_image = tokens * model.embed_dim * len(model.blocks) * _BACKWARD_BYTES
    return max(1, _PASS_BUDGET_BYTES // per_image)


def _integrate(ig, inputs, baselines, target: int, diff: float, s: AttributionSettings,
               per_pass: int):
    """captum's integral with :attr:`AttributionSettings.steps` Gauss–Legendre nodes, doubled
    while the convergence delta exceeds the tolerance (up to ``max_steps``); stops early
    when doubling from 16 nodes on no longer halves the delta (a function that is not
    smooth along the path, e.g. DyT's hard token routing, never converges; below 16 nodes
    the error is not monotonic yet). Returns (attributions, delta, nodes) of the smallest
    delta."""
    steps, previous, best = s.steps, None, None
    while True:
        a, d = ig.attribute(inputs, baselines=baselines, target=target, n_steps=steps,
                            method="gausslegendre", internal_batch_size=min(steps, per_pass),
                            return_convergence_delta=True)
        d = float(d)
        if best is None or abs(d) < abs(best[1]):
            best = (a, d, steps)
        stalled = previous is not None and steps >= 32 and abs(d) > 0.5 * abs(previous)
        if abs(d) <= s.tolerance * max(abs(diff), 1e-6) or 2 * steps > s.max_steps or stalled:
            return best
        previous, steps = d, 2 * steps


def _removal(cells, grid: tuple[int, int] | None, share: float, seed: int):
    """captum perturbation: random cells (patches of the image, or tokens) set to the
    baseline, each with probability ``share``; returns (perturbation, perturbed input)."""
    import torch

    def perturb(inputs, baselines):
        g = torch.Generator().manual_seed(seed)
        n = inputs.shape[0]
        keep = torch.rand((n, cells), generator=g) < share
        if grid is None:  # tokens: (n, T, D)
            mask = keep[:, :, None].to(inputs.dtype)
        else:  # pixels: patches of the grid, up-sampled to the image
            h, w = grid
            mask = keep.view(n, 1, h, w).to(inputs.dtype)
            mask = torch.nn.functional.interpolate(mask, size=inputs.shape[-2:],
                                                   mode="nearest")
        perturbation = mask * (inputs - baselines)
        return perturbation, inputs - perturbation
    return perturb


class _Recorder:
    """A forward function that keeps its outputs (the logit changes infidelity compares)."""

    def __init__(self, forward):
        self.forward, self.outputs = forward, []

    def __call__(self, x):
        out = self.forward(x)
        self.outputs.append(out.detach())
        return out


def _trust(forward, explain, inputs, baselines, attributions, target: int, perturb,
           s: AttributionSettings) -> dict[str, float]:
    """captum's infidelity (absolute, and relative to the mean squared logit change of the
    same perturbations) and max-sensitivity of ``attributions``."""
    import torch
    from captum.metrics import infidelity, sensitivity_max

    rec = _Recorder(forward)
    infid = float(infidelity(rec, perturb, inputs, attributions, baselines=baselines,
                             target=target, n_perturb_samples=s.infidelity_samples,
                             normalize=True))
    perturbed = next(o for o in rec.outputs if len(o) == s.infidelity_samples)
    original = next(o for o in rec.outputs if len(o) == len(inputs))
    change = float(((original[:, target] - perturbed[:, target]) ** 2).mean())
    scale = float(inputs.detach().std())
    torch.manual_seed(s.seed)  # captum's default perturbation draws from the global RNG
    sens = float(sensitivity_max(explain, inputs, perturb_radius=s.radius * scale,
                                 n_perturb_samples=s.sensitivity_samples,
                                 baselines=baselines, target=target))
    return {"infidelity": infid, "infidelity_rel": infid / change if change > 0 else np.nan,
            "sensitivity": sens}


def attribute(model, image, *, mean, std, settings: AttributionSettings | None = None,
              label: int | None = None, metrics: bool = True) -> dict[str, Any]:
    """Attributions of ``image`` (1 × 3 × H × W, normalised) for ``model`` (see the module
    docstring). ``label``: the true class, needed for ``target="true"``."""
    import torch
    from captum.attr import IntegratedGradients

    from ...probes.attention import cls_rollout
    from ...probes.representations import (
        block_input,
        forward_above,
        model_lock,
        num_patches,
        patch_grid,
    )

    s = settings or AttributionSettings()
    depth = len(model.blocks)
    block = depth - 1 if s.block is None else int(s.block)
    t0 = time.perf_counter()
    x = image.detach()
    base = baseline_image(x, mean, std, s.baseline)
    with model_lock(model):
        with torch.no_grad():
            logits = model(torch.cat([x, base]))
        probs = logits[:1].softmax(1)[0]
        predicted = int(probs.argmax())
        if s.target == "true" and label is None:
            raise ValueError("target 'true' needs the image's label")
        target = predicted if s.target == "predicted" else int(label)
        out: dict[str, Any] = {
            "target": target, "predicted": predicted, "confidence": float(probs[predicted]),
            "target_prob": float(probs[target]),
            "logit_diff": float(logits[0, target] - logits[1, target]), "block": block}

        ig = IntegratedGradients(model)
        per_pass = _per_pass(model, num_patches(model) + model.num_prefix_tokens)
        attr, delta, steps = _integrate(ig, x, base, target, out["logit_diff"], s, per_pass)
        out.update(ig=attr[0].sum(0).numpy().astype(np.float32), ig_sum=float(attr.sum()),
                   ig_delta=delta, ig_steps=steps)

        h = block_input(model, torch.cat([x, base]), block)
        hx, hb = h[:1], h[1:]

        def above(seq):
            return forward_above(model, block, seq)

        lig = IntegratedGradients(above)
        lattr, ldelta, lsteps = _integrate(lig, hx, hb, target, out["logit_diff"], s, per_pass)
        per_token = lattr[0].sum(-1)  # (T,)
        n_prefix, n_patch = model.num_prefix_tokens, num_patches(model)
        total = float(per_token.sum())
        out.update(
            layer=per_token[per_token.shape[0] - n_patch:].reshape(patch_grid(model))
            .numpy().astype(np.float32),
            layer_sum=total, layer_delta=ldelta, layer_steps=lsteps,
            layer_prefix=float(per_token[:n_prefix].sum()),
            layer_prompts=float(per_token[n_prefix:per_token.shape[0] - n_patch].sum()),
            layer_tokens=int(per_token.shape[0]))

        roll, other = cls_rollout(model, x)
        out.update(rollout=roll[0].reshape(patch_grid(model)).numpy().astype(np.float32),
                   rollout_other=float(other[0]))
        out["seconds_maps"] = time.perf_counter() - t0

        if metrics:
            def explain_input(inp, baselines, target):  # the map as computed: same nodes
                return ig.attribute(inp, baselines=baselines, target=target, n_steps=steps,
                                    method="gausslegendre",
                                    internal_batch_size=min(steps * len(inp), per_pass))

            def explain_layer(inp, baselines, target):
                return lig.attribute(inp, baselines=baselines, target=target, n_steps=lsteps,
                                     method="gausslegendre",
                                     internal_batch_size=min(lsteps * len(inp), per_pass))

            t1 = time.perf_counter()
            grid = patch_grid(model)
            for name, fwd, expl, inp, bl, a, perturb in (
                    ("ig", model, explain_input, x, base, attr,
                     _removal(n_patch, grid, s.removal, s.seed)),
                    ("layer", above, explain_layer, hx, hb, lattr,
                     _removal(hx.shape[1], None, s.removal, s.seed))):
                for k, v in _trust(fwd, expl, inp, bl, a, target, perturb, s).items():
                    out[f"{name}_{k}"] = v
            out["seconds_metrics"] = time.perf_counter() - t1
    out["seconds"] = time.perf_counter() - t0
    return out


# -- cached per run and image -------------------------------------------------------------
ARRAYS = ("ig", "layer", "rollout")


def _record_name(index: int, s: AttributionSettings) -> str:
    tag = hashlib.sha1(records.key_text(s.key()).encode()).hexdigest()[:10]
    return f"attributions-test{index}-{tag}.npz"


def load_attribution(run_path: str | Path, index: int, settings: AttributionSettings, *,
                     writable: bool) -> dict[str, Any] | None:
    rec = records.load_npz(records.run_dir(run_path, writable=writable)
                           / _record_name(index, settings),
                           fingerprint=records.run_fingerprint(run_path),
                           settings=settings.key())
    if rec is None:
        return None
    arrays, meta = rec
    return {**meta["values"], **arrays}


def save_attribution(run_path: str | Path, index: int, settings: AttributionSettings,
                     result: dict[str, Any], *, writable: bool) -> None:
    arrays = {k: result[k] for k in ARRAYS}
    values = {k: v for k, v in result.items() if k not in ARRAYS}
    records.save_npz(records.run_dir(run_path, writable=writable)
                     / _record_name(index, settings), arrays,
                     {"fingerprint": records.run_fingerprint(run_path),
                      "settings": settings.key(), "image": int(index), "values": values})


def run_attribution(run_path: str | Path, index: int, settings: AttributionSettings, *,
                    writable: bool, trained=None, save: bool = True) -> dict[str, Any]:
    """Attributions of test image ``index`` for a run: its record, or computed (and kept)."""
    from .models import load_view_model, test_image

    rec = load_attribution(run_path, index, settings, writable=writable)
    if rec is not None:
        return rec
    trained = trained or load_view_model(run_path)
    img = test_image(trained, index)
    res = attribute(trained.model, img["x"], mean=img["mean"], std=img["std"],
                    settings=settings, label=img["label"])
    res["label"] = img["label"]
    if save:
        save_attribution(run_path, index, settings, res, writable=writable)
    return res
