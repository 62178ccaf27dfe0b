"""VeLoRA's records, seen from finished runs: training memory against G, and how close the
compressed weight gradients stay to the exact ones.

A VeLoRA run records (``artifacts/method.npz``, :meth:`vpeft_viz.methods.velora.VeLoRA.
artifacts`; docs/methods.md): at its first training step, the bytes autograd keeps for
backward with VeLoRA and with plain LoRA on the same model and batch (and on CUDA each step's
allocator peak); at a few points over training, per layer and target, the cosine similarity
and the norm ratio of the compressed to the exact weight gradient of the down-projections,
and the share of the sub-tokens' energy that the layer's vector ``v`` captures. This module
turns those records into what the VeLoRA page shows:

* :meth:`VeLoRARecord.breakdown`: what each of LoRA and VeLoRA keeps, split into the
  down-projections' inputs (LoRA: the activations; VeLoRA: one fp16 number per sub-token)
  and everything else (the same in both);
* :func:`g_sweep`: saved bytes, peak memory and test accuracy of the VeLoRA runs of one task
  and backbone against G, with the LoRA runs of that task as the accuracy reference;
* :func:`cosine_by_point`, :func:`cosine_matrix`: the gradient comparison per layer over
  training (mean over the few batches measured at each point).

Everything here is array arithmetic on stored records: no model is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

REFERENCE_METHOD = "lora"
_REQUIRED = ("groups", "width", "depth", "targets", "saved_bytes_velora", "saved_bytes_lora",
             "z_bytes", "memory_batch_size")
SWEEP_COLUMNS = ["run_id", "groups", "sub_token", "test_acc", "saved_velora", "saved_lora",
                 "z_bytes", "lora_inputs", "peak_velora", "peak_lora", "final_cos",
                 "batch_size", "device", "precision"]


def _opt_int(arrays: Mapping[str, Any], key: str) -> int | None:
    return int(arrays[key]) if key in arrays else None


@dataclass
class VeLoRARecord:
    """One VeLoRA run's memory and gradient records (L layers, T targets, S probed steps)."""

    groups: int
    width: int
    depth: int
    targets: str
    velora_scale: float
    v: np.ndarray  # (L, width/G) the fixed unit vectors
    saved_velora: int  # bytes kept for backward beyond the parameters, one training step
    saved_lora: int  # the same with plain LoRA, same model and batch
    z_bytes: int  # what VeLoRA keeps of the down-projections' inputs
    batch_size: int
    tokens: int
    device: str
    precision: str
    peak_velora: int | None  # CUDA: allocator peak of the step above its start
    peak_lora: int | None
    grad_steps: np.ndarray  # (S,) 1-based training steps probed
    grad_points: np.ndarray  # (S,) which point over training each belongs to
    grad_cos: np.ndarray  # (S, L, T)
    grad_ratio: np.ndarray  # (S, L, T) ‖compressed‖ / ‖exact‖
    energy: np.ndarray  # (S, L) Σz² / Σ|s|²
    total_steps: int
    epochs: int

    @classmethod
    def from_artifacts(cls, arrays: Mapping[str, np.ndarray]) -> VeLoRARecord:
        missing = [k for k in _REQUIRED if k not in arrays]
        if missing:
            raise KeyError(f"not a VeLoRA record (missing {', '.join(missing)})")
        depth, targets = int(arrays["depth"]), str(arrays["targets"])
        s = len(np.asarray(arrays.get("grad_steps", ())))
        cos = np.asarray(arrays.get("grad_cos", np.zeros((0, depth, len(targets)))), float)
        ratio = np.asarray(arrays.get("grad_norm_ratio", np.zeros_like(cos)), float)
        energy = np.asarray(arrays.get("captured_energy", np.zeros((s, depth))), float)
        if cos.shape != (s, depth, len(targets)) or ratio.shape != cos.shape or (
                energy.shape != (s, depth)):
            raise ValueError(f"inconsistent VeLoRA record: {s} probed steps, {depth} layers, "
                             f"targets {targets!r}, cosines {cos.shape}, energy {energy.shape}")
        return cls(
            groups=int(arrays["groups"]), width=int(arrays["width"]), depth=depth,
            targets=targets, velora_scale=float(arrays.get("velora_scale", 1.0)),
            v=np.asarray(arrays.get("v", np.zeros((depth, 0))), float),
            saved_velora=int(arrays["saved_bytes_velora"]),
            saved_lora=int(arrays["saved_bytes_lora"]), z_bytes=int(arrays["z_bytes"]),
            batch_size=int(arrays["memory_batch_size"]),
            tokens=int(arrays.get("memory_tokens", -1)),
            device=str(arrays.get("memory_device", "?")),
            precision=str(arrays.get("memory_precision", "?")),
            peak_velora=_opt_int(arrays, "peak_step_bytes_velora"),
            peak_lora=_opt_int(arrays, "peak_step_bytes_lora"),
            grad_steps=np.asarray(arrays.get("grad_steps", np.zeros(0)), np.int64),
            grad_points=np.asarray(arrays.get("grad_points", np.zeros(0)), np.int64),
            grad_cos=cos, grad_ratio=ratio, energy=energy,
            total_steps=int(arrays.get("total_steps", 0)), epochs=int(arrays.get("epochs", 0)))

    @property
    def sub_token(self) -> int:
        return self.width // self.groups

    @property
    def lora_inputs(self) -> int:
        """What LoRA keeps of the down-projections' inputs: the measured difference of the two
        steps plus what VeLoRA keeps in their place."""
        return self.saved_lora - self.saved_velora + self.z_bytes

    @property
    def other(self) -> int:
        """Everything else kept for backward (the same tensors in both)."""
        return self.saved_velora - self.z_bytes

    @property
    def saving(self) -> float:
        """Share of LoRA's saved-for-backward bytes that VeLoRA does not keep."""
        return 1.0 - self.saved_velora / self.saved_lora if self.saved_lora else math.nan

    @property
    def has_gradients(self) -> bool:
        return len(self.grad_steps) > 0

    def breakdown(self) -> pd.DataFrame:
        """Rows LoRA and VeLoRA, columns ``inputs`` (of the down-projections) and ``other``."""
        return pd.DataFrame({"method": ["LoRA", "VeLoRA"],
                             "inputs": [self.lora_inputs, self.z_bytes],
                             "other": [self.other, self.other],
                             "total": [self.saved_lora, self.saved_velora]})

    def final_cos(self) -> float:
        """Mean cosine over layers and targets at the last point measured (NaN: none)."""
        if not self.has_gradients:
            return math.nan
        last = self.grad_points == self.grad_points.max()
        return float(np.nanmean(self.grad_cos[last]))


def _target_slice(rec: VeLoRARecord, target: str | None) -> np.ndarray:
    if target is None:
        return np.arange(len(rec.targets))
    if target not in rec.targets:
        raise ValueError(f"target {target!r} not in this run's targets {rec.targets!r}")
    return np.array([rec.targets.index(target)])


def cosine_by_point(rec: VeLoRARecord, target: str | None = None) -> pd.DataFrame:
    """One row per (point over training, layer): mean step and epoch of the batches measured
    there, and their mean cosine, norm ratio (over ``target``, or every target) and captured
    energy."""
    cols = ["point", "step", "epoch", "layer", "cos", "ratio", "energy", "batches"]
    if not rec.has_gradients:
        return pd.DataFrame(columns=cols)
    t = _target_slice(rec, target)
    per_epoch = rec.total_steps / rec.epochs if rec.epochs else math.nan
    rows = []
    for p in np.unique(rec.grad_points):
        sel = rec.grad_points == p
        step = float(rec.grad_steps[sel].mean())
        for layer in range(rec.depth):
            rows.append({"point": int(p), "step": step, "epoch": step / per_epoch,
                         "layer": layer,
                         "cos": float(np.nanmean(rec.grad_cos[sel][:, layer, t])),
                         "ratio": float(np.nanmean(rec.grad_ratio[sel][:, layer, t])),
                         "energy": float(np.nanmean(rec.energy[sel][:, layer])),
                         "batches": int(sel.sum())})
    return pd.DataFrame(rows, columns=cols)


def cosine_matrix(rec: VeLoRARecord, target: str | None = None,
                  value: str = "cos") -> tuple[np.ndarray, list[float]]:
    """(layers × points) of ``value`` (``cos``, ``ratio`` or ``energy``) and each point's mean
    training step."""
    df = cosine_by_point(rec, target)
    if df.empty:
        return np.zeros((rec.depth, 0)), []
    wide = df.pivot(index="layer", columns="point", values=value)
    steps = df.groupby("point")["step"].first().loc[wide.columns].tolist()
    return wide.to_numpy(float), steps


def g_sweep(velora_runs: Iterable[Mapping[str, Any]], table: pd.DataFrame, *, task: str,
            backbone: str, batch_size: int | None = None
            ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """VeLoRA runs of one task and backbone against G, and the LoRA runs beside them.

    ``velora_runs``: one mapping per run with ``run_id``, ``task``, ``backbone`` and its
    :class:`VeLoRARecord` under ``record``; ``table``: the run table
    (:func:`vpeft_viz.analysis.compare.load_runs`), for test accuracies and the reference.
    ``batch_size``: keep only runs whose memory was measured at that batch size (bytes grow
    with it). Returns (VeLoRA rows sorted by G, the LoRA reference: mean and standard
    deviation of test accuracy over its runs, and how many).
    """
    acc = dict(zip(table["run_id"], table["test_acc"])) if len(table) else {}
    rows = []
    for run in velora_runs:
        rec: VeLoRARecord = run["record"]
        if run["task"] != task or run["backbone"] != backbone:
            continue
        if batch_size is not None and rec.batch_size != batch_size:
            continue
        a = acc.get(run["run_id"])
        rows.append({"run_id": run["run_id"], "groups": rec.groups, "sub_token": rec.sub_token,
                     "test_acc": math.nan if a is None else float(a),
                     "saved_velora": rec.saved_velora, "saved_lora": rec.saved_lora,
                     "z_bytes": rec.z_bytes, "lora_inputs": rec.lora_inputs,
                     "peak_velora": math.nan if rec.peak_velora is None else rec.peak_velora,
                     "peak_lora": math.nan if rec.peak_lora is None else rec.peak_lora,
                     "final_cos": rec.final_cos(), "batch_size": rec.batch_size,
                     "device": rec.device, "precision": rec.precision})
    sweep = pd.DataFrame(rows, columns=SWEEP_COLUMNS)
    sweep = sweep.sort_values(["groups", "run_id"], kind="stable").reset_index(drop=True)
    ref = pd.DataFrame(columns=["method", "test_acc", "test_acc_std", "runs"])
    if len(table):
        same = table[(table["task"] == task) & (table["backbone"] == backbone)
                     & (table["method"] == REFERENCE_METHOD)]
        if len(same):
            accs = pd.to_numeric(same["test_acc"], errors="coerce").dropna()
            ref = pd.DataFrame([{"method": REFERENCE_METHOD, "test_acc": float(accs.mean()),
                                 "test_acc_std": float(accs.std(ddof=0)) if len(accs) else
                                 math.nan, "runs": int(len(accs))}])
    return sweep, ref
