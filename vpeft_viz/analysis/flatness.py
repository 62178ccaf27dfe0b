"""Weight-space flatness of a finished run: landscapes, curvature, noise robustness.

Why: low-bit adapters work because adapters sit in *flat* minima — moving their weights a
lot (by quantising them to 1 bit, say) barely changes the loss. This module measures that on
any finished run whose weights are stored, in the run's own parameter space:

* the space is the method's trainable weights (every backbone weight for full fine-tuning;
  the head for linear probing, which trains nothing else). For a low-bit run these are the
  de-quantised matrices read back from the packed file — the weights the model really uses;
* the data is a fixed subset of the run's validation split: its first ``images`` images in
  split order, the model in eval mode;
* measured: 1-D and 2-D loss/accuracy landscapes along filter-normalised random directions
  (:mod:`vpeft_viz.probes.landscape`), the Hessian's top eigenvalue (Lanczos) and its trace
  (Hutchinson) (:mod:`vpeft_viz.probes.hessian`), and loss/accuracy under relative Gaussian
  weight noise.

The result is a JSON record cached with the run (``artifacts/flatness.json``; for a run in a
read-only store, in the user cache) and recomputed only when asked for other settings.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ARTIFACT = "flatness.json"
RECORD_VERSION = 1
Progress = Callable[[str, int, int], None]  # (stage, done, total)
PRECISIONS = ("fp32", "bf16")


@dataclass
class FlatnessSettings:
    """How a flatness record is measured (stored with it; another setting recomputes)."""

    images: int = 256  # first validation images of the split, always the same ones
    points_1d: int = 41  # odd: the centre is the trained model
    grid_2d: int = 21  # points per side of the 2-D landscape (odd)
    radius: float = 1.0  # landscape extent, in units of the weights' own filter norms
    noise: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)  # relative σ
    draws: int = 5  # noise draws averaged per level
    lanczos_steps: int = 20  # most Hessian-vector products for the top eigenvalue
    trace_samples: int = 10  # Rademacher vectors of the Hutchinson estimate
    seed: int = 0  # directions, noise and probe vectors
    batch_size: int = 256  # images per forward pass
    # Landscapes and noise in fp32 (default) or under bf16 autocast (about 3× faster on CPUs
    # with AMX; the Hessian figures stay fp32: double backprop in bf16 is too coarse).
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"flatness setting precision must be one of "
                             f"{', '.join(PRECISIONS)}, got {self.precision!r}")

    @classmethod
    def from_strings(cls, values: dict[str, str]) -> FlatnessSettings:
        """Settings from ``KEY=VALUE`` strings (``noise`` as comma-separated levels)."""
        out: dict[str, Any] = {}
        defaults = asdict(cls())
        for k, v in values.items():
            if k not in defaults:
                raise ValueError(f"unknown flatness setting {k!r}; known: "
                                 f"{', '.join(defaults)}")
            try:
                if k == "noise":
                    out[k] = tuple(float(x) for x in v.split(",") if x.strip())
                else:
                    out[k] = type(defaults[k])(v)
            except ValueError:
                raise ValueError(f"flatness setting {k} must be a "
                                 f"{type(defaults[k]).__name__}, got {v!r}") from None
        return cls(**out)

    def key(self) -> dict[str, Any]:
        d = asdict(self)
        d["noise"] = [float(x) for x in self.noise]
        return d


def record_path(run_path: Path, *, writable: bool) -> Path:
    """Where a run's flatness record lives: with the run, or (read-only store) in the cache."""
    run_path = Path(run_path)
    if writable:
        return run_path / "artifacts" / ARTIFACT
    base = Path(os.environ.get("VPEFT_VIZ_CACHE", Path.home() / ".cache" / "vpeft_viz"))
    return base / "flatness" / f"{run_path.name}.json"


def load_record(run_path: Path, settings: FlatnessSettings | None = None) -> dict | None:
    """The stored record (with the run, else in the cache), or None when there is none or it
    was computed with other settings (``settings`` None: any)."""
    for writable in (True, False):
        path = record_path(run_path, writable=writable)
        if not path.is_file():
            continue
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if rec.get("version") != RECORD_VERSION or not isinstance(rec.get("settings"), dict):
            continue
        # a setting added later is missing from older records: they used its default
        rec["settings"] = {**FlatnessSettings().key(), **rec["settings"]}
        if settings is None or rec.get("settings") == settings.key():
            return rec
    return None


def _space(trained) -> tuple[list, str]:
    from ..methods import head_parameters

    params = [p for _, p in trained.method.trainable_parameters(trained.model)]
    if params:
        what = ("every backbone weight" if trained.method.trains_backbone
                else f"{trained.method.title or trained.method.name} weights")
        return params, what
    return head_parameters(trained.model), "classifier head (the method trains nothing else)"


def validation_batches(trained, images: int, batch_size: int, device) -> list:
    """The first ``images`` validation images of the run's task, preprocessed as in training."""
    from ..backbones import image_size, input_stats
    from ..data.dataset import ImageDataset, resolve_normalization

    cfg = trained.config
    samples = trained.task.splits["val"][:images]
    if not samples:
        raise ValueError(f"task {trained.task.name} has no validation images")
    mean, std = resolve_normalization(cfg["data"]["normalization"], *input_stats(trained.model))
    ds = ImageDataset(samples, image_size=image_size(trained.model), mean=mean, std=std,
                      num_classes=trained.task.num_classes)
    out = []
    for start in range(0, len(ds), batch_size):
        x, y = ds[list(range(start, min(start + batch_size, len(ds))))]
        out.append((x.to(device), y.to(device)))
    return out


def compute_flatness(run_path: Path, settings: FlatnessSettings | None = None, *,
                     device: str = "cpu", progress: Progress | None = None,
                     save: bool = True, writable: bool = True) -> dict[str, Any]:
    """Measure a finished run (see the module docstring) and store the record."""
    import torch

    from ..probes import hessian, landscape
    from ..runs.store import Run
    from ..runs.weights import load_run_model

    s = settings or FlatnessSettings()
    run = Run(Path(run_path), read_only=True)
    step = progress or (lambda stage, done, total: None)
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    step("loading the run's model", 0, 1)
    trained = load_run_model(run, device=device)
    params, what = _space(trained)
    batches = validation_batches(trained, s.images, s.batch_size, device)
    model = trained.model
    timing["load_s"] = time.perf_counter() - t0

    amp = torch.bfloat16 if s.precision == "bf16" else None
    with torch.inference_mode(False):
        t = time.perf_counter()
        loss0, acc0 = landscape.loss_and_accuracy(model, batches, amp=amp)
        gen = torch.Generator().manual_seed(s.seed)
        d1 = landscape.filter_normalised_direction(params, gen)
        d2 = landscape.filter_normalised_direction(params, gen)
        alphas = landscape.symmetric_grid(s.points_1d, s.radius)
        l1, a1 = landscape.landscape_1d(model, params, batches, d1, alphas, amp=amp,
                                        progress=lambda d, n: step("1-D landscape", d, n))
        timing["landscape_1d_s"] = time.perf_counter() - t
        t = time.perf_counter()
        grid = landscape.symmetric_grid(s.grid_2d, s.radius)
        l2, a2 = landscape.landscape_2d(model, params, batches, d1, d2, grid, grid, amp=amp,
                                        progress=lambda d, n: step("2-D landscape", d, n))
        timing["landscape_2d_s"] = time.perf_counter() - t
        t = time.perf_counter()
        op = hessian.HessianOperator(model, params, batches)
        ext = hessian.lanczos_extremes(op, max_steps=s.lanczos_steps, seed=s.seed,
                                       progress=lambda d, n: step("top eigenvalue", d, n))
        timing["top_eigenvalue_s"] = time.perf_counter() - t
        t = time.perf_counter()
        tr = hessian.hutchinson_trace(op, samples=s.trace_samples, seed=s.seed,
                                      progress=lambda d, n: step("Hessian trace", d, n))
        timing["trace_s"] = time.perf_counter() - t
        t = time.perf_counter()
        noise = landscape.weight_noise(model, params, batches, list(s.noise), draws=s.draws,
                                       seed=s.seed, amp=amp,
                                       progress=lambda d, n: step("weight noise", d, n))
        timing["noise_s"] = time.perf_counter() - t

    summary = run.summary() or {}
    n_params = int(sum(p.numel() for p in params))
    rec = {
        "version": RECORD_VERSION, "run_id": run.id, "settings": s.key(),
        "method": trained.config["method"], "method_config": trained.config["method_config"],
        "task": trained.task.name, "images": int(sum(int(y.numel()) for _, y in batches)),
        "space": {"what": what, "params": n_params, "tensors": len(params)},
        "trained": {"loss": loss0, "acc": acc0, "test_acc": summary.get("test_acc")},
        "landscape_1d": {"alphas": alphas.tolist(), "loss": l1.tolist(), "acc": a1.tolist()},
        "landscape_2d": {"alphas": grid.tolist(), "betas": grid.tolist(), "loss": l2.tolist(),
                         "acc": a2.tolist()},
        "sharpness": {"top_eigenvalue": ext.top, "lowest_ritz_value": ext.bottom,
                      "lanczos_products": ext.steps, "converged": ext.converged,
                      "trace": tr.trace, "trace_stderr": tr.stderr,
                      "trace_per_weight": tr.trace / n_params},
        "noise": {"sigmas": [float(x) for x in s.noise],
                  **{k: v.tolist() for k, v in noise.items()}},
        "timing_s": {k: round(v, 3) for k, v in timing.items()},
        "device": str(device), "computed": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if save:
        save_record(run_path, rec, writable=writable)
    return rec


def save_record(run_path: Path, rec: dict[str, Any], *, writable: bool) -> Path:
    from ..runs.store import atomic_write_json

    path = record_path(run_path, writable=writable)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, rec)
    return path


# -- what the page compares ------------------------------------------------------------------
def run_label(method: str, method_config: dict[str, Any]) -> str:
    """``bi-adaptformer · 1 bit``; other methods by name."""
    bits = method_config.get("bits") if method.startswith("bi-") else None
    return f"{method} · {bits} bit" if bits is not None else method


def stored_kb(summary: dict[str, Any]) -> float | None:
    """The method's weights on disk (head excluded), KB: the packed file for low-bit runs,
    4 bytes per trained weight otherwise."""
    if summary.get("adapter_bytes") is not None:
        return summary["adapter_bytes"] / 1024
    n = summary.get("trainable_params_excl_head")
    return None if n is None else 4 * n / 1024


def frontier_rows(summaries: list[dict[str, Any]],
                  configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Accuracy against bits against stored KB, one row per finished run."""
    rows = []
    for s, c in zip(summaries, configs):
        if s is None or s.get("test_acc") is None:
            continue
        bits = c.get("method_config", {}).get("bits", 32)
        rows.append({"run_id": s.get("run_id"), "task": s.get("task"),
                     "label": run_label(c["method"], c.get("method_config", {})),
                     "method": c["method"], "bits": int(bits), "kb": stored_kb(s),
                     "test_acc": float(s["test_acc"])})
    return rows


def settings_differ(records: list[dict[str, Any]]) -> str:
    """The settings on which ``records`` disagree, as ``"images, grid_2d"``; empty if none."""
    keys = sorted({k for r in records for k in r.get("settings", {})})
    return ", ".join(k for k in keys
                     if len({json.dumps(r.get("settings", {}).get(k)) for r in records}) > 1)


def sharpness_rows(records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The sharpness table: one row per record (name → record)."""
    rows = []
    for name, r in records.items():
        sh = r["sharpness"]
        rows.append({"run": name, "weights": r["space"]["params"],
                     "val loss": r["trained"]["loss"], "val acc": r["trained"]["acc"],
                     "top eigenvalue": sh["top_eigenvalue"], "trace": sh["trace"],
                     "trace ± (s.e.)": sh["trace_stderr"],
                     "trace / weight": sh["trace_per_weight"],
                     "loss rise at radius": max(r["landscape_1d"]["loss"][0],
                                                r["landscape_1d"]["loss"][-1])
                     - r["trained"]["loss"]})
    return rows


def weight_histograms(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """A low-bit run's ``method.npz``: standardised latent-weight histograms and codebook."""
    for key in ("hist_edges", "hist_counts", "matrix_names"):
        if key not in arrays:
            raise KeyError(f"no {key} in the run's method record")
    return {"edges": np.asarray(arrays["hist_edges"]),
            "counts": np.asarray(arrays["hist_counts"]),
            "names": [str(n) for n in arrays["matrix_names"]],
            "codebook": np.asarray(arrays.get("codebook", np.zeros(0))),
            "bits": int(np.asarray(arrays.get("bits", 32)))}


def measure_missing(store, run_ids, settings: FlatnessSettings,
                    progress: Callable[[int, int, str], None] | None = None) -> list[str]:
    """Compute the records of ``run_ids`` in ``store`` that are missing or were made with other
    settings, for runs whose weights are stored; returns the run ids measured (the shipped
    store's records, ``python -m vpeft_viz cache-runs``)."""
    measured = []
    for i, run_id in enumerate(run_ids):
        run = store.get(run_id)
        if load_record(run.path, settings) is not None or not run.weights_path.is_file():
            continue
        if progress:
            progress(i, len(run_ids), f"flatness of {run_id}")
        compute_flatness(run.path, settings)
        measured.append(run_id)
    return measured
