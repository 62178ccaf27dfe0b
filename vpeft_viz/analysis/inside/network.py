"""Where each method changed the network: per-layer CKA against the frozen backbone, the CLS
features before and after tuning, and how linearly separable the classes are at each layer.

On one *image set* (the first ``images`` test images of the task, in split order):

* :func:`measure_runs` feeds every batch through the frozen backbone once and through each
  tuned run, and accumulates, per layer (:func:`vpeft_viz.probes.representations.layer_names`),
  the exact linear CKA between the frozen and the tuned token representations
  (:class:`~.cka.StreamingCKA`: every image token is an example) and the CLS features. A run's
  record (``network-test<n>.npz``) keeps the token CKA, the CKA of the CLS features alone,
  and the CLS features (float16) for the 2-D embeddings; the frozen backbone's record keeps
  its CLS features (:mod:`.records` says where).
* :func:`fit_probes` measures linear separability per layer: a scikit-learn logistic
  regression on the standardised CLS features of the train split (its first
  ``probe_train`` images), the inverse regularisation C chosen on the validation split
  (first ``probe_val``) from :attr:`NetworkSettings.probe_c`, accuracy reported on the image
  set. Records: ``probes-test<n>.json`` per run and for the frozen backbone.
* :func:`embed_2d`: PCA (default) or t-SNE of features, for the side-by-side scatter plots.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import records
from .cka import StreamingCKA, linear_cka
from .models import FrozenSpec, batches, load_frozen, load_view_model, run_config, split_dataset

Progress = Callable[[str, int, int], None]  # (stage, done, total)
TOKEN_BUDGET_BYTES = 2 * 10**8  # one model's tokens of one batch, all layers


@dataclass
class NetworkSettings:
    """What a network record is computed on (stored with it; others recompute)."""

    images: int = 500  # first test images
    batch_size: int = 64  # images per forward pass (smaller when the tokens would not fit)
    probe_train: int = 800  # first train images the probes are fitted on
    probe_val: int = 200  # first validation images C is chosen on
    probe_c: tuple[float, ...] = field(default=(0.01, 0.1, 1.0, 10.0))

    def cka_key(self) -> dict[str, Any]:
        return {"images": self.images}

    def probe_key(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("batch_size")
        d["probe_c"] = [float(c) for c in self.probe_c]
        return d


def _name(kind: str, s: NetworkSettings) -> str:
    return f"{kind}-test{s.images}" + (".npz" if kind == "network" else ".json")


# -- records ------------------------------------------------------------------------------
def load_network(run_path: str | Path, settings: NetworkSettings, *, writable: bool
                 ) -> dict[str, Any] | None:
    """A run's CKA record (None until computed)."""
    rec = records.load_npz(records.run_dir(run_path, writable=writable)
                           / _name("network", settings),
                           fingerprint=records.run_fingerprint(run_path),
                           settings=settings.cka_key())
    return None if rec is None else {**rec[1], **rec[0]}


def load_frozen_network(spec: FrozenSpec, settings: NetworkSettings) -> dict[str, Any] | None:
    rec = records.load_npz(records.frozen_dir() / f"{spec.key()}-{_name('network', settings)}",
                           fingerprint=None, settings=settings.cka_key())
    return None if rec is None else {**rec[1], **rec[0]}


def load_probes(run_path: str | Path, settings: NetworkSettings, *, writable: bool
                ) -> dict[str, Any] | None:
    return records.load_json(records.run_dir(run_path, writable=writable)
                             / _name("probes", settings),
                             fingerprint=records.run_fingerprint(run_path),
                             settings=settings.probe_key())


def load_frozen_probes(spec: FrozenSpec, settings: NetworkSettings) -> dict[str, Any] | None:
    return records.load_json(records.frozen_dir() / f"{spec.key()}-{_name('probes', settings)}",
                             fingerprint=None, settings=settings.probe_key())


# -- CKA and CLS features -----------------------------------------------------------------
def _batch_size(model, settings: NetworkSettings) -> int:
    from ...probes.representations import layer_names, num_patches

    per_image = ((num_patches(model) + model.num_prefix_tokens) * model.embed_dim
                 * len(layer_names(model)) * 4)
    return max(1, min(settings.batch_size, TOKEN_BUDGET_BYTES // per_image))


def token_cka(frozen, models: Sequence, data, batch_size: int,
              progress: Progress | None = None) -> dict[str, Any]:
    """The CKA pass on a prepared image set: per layer, token CKA of each model with
    ``frozen``, and the CLS features of all of them.

    Returns ``cka_tokens`` (models × layers), ``cka_cls`` (models × layers), ``frozen_cls``
    (n × layers × d), ``cls`` (models × n × layers × d) and ``labels`` (n).
    """
    from ...probes.representations import layer_names, layer_tokens, summary_token

    names = layer_names(frozen)
    streams = [StreamingCKA(len(models)) for _ in names]
    f_cls, m_cls, labels = [], [[] for _ in models], []
    done = 0
    for x, y in batches(data, batch_size):
        ref = layer_tokens(frozen, x)
        f_cls.append(np.stack([summary_token(t, frozen).numpy() for t in ref], 1))
        tuned = [layer_tokens(m, x) for m in models]
        for i, stream in enumerate(streams):
            stream.add(ref[i].reshape(-1, ref[i].shape[-1]),
                       [t[i].reshape(-1, t[i].shape[-1]) for t in tuned])
        for j, (m, toks) in enumerate(zip(models, tuned)):
            m_cls[j].append(np.stack([summary_token(t, m).numpy() for t in toks], 1))
        labels.append(y.numpy())
        done += len(y)
        if progress:
            progress("CKA and CLS features", done, len(data))
    frozen_cls = np.concatenate(f_cls)
    cls = [np.concatenate(c) for c in m_cls]
    cka_tokens = np.array([s.values() for s in streams]).T.reshape(len(models), len(names))
    cka_cls = np.array([[linear_cka(frozen_cls[:, i], c[:, i]) for i in range(len(names))]
                        for c in cls]).reshape(len(models), len(names))
    return {"layers": names, "cka_tokens": cka_tokens, "cka_cls": cka_cls,
            "frozen_cls": frozen_cls, "cls": cls, "labels": np.concatenate(labels)}


def _stored_or_todo(runs: Sequence[tuple[str | Path, bool]],
                    load: Callable[[str | Path, bool], dict[str, Any] | None],
                    ) -> tuple[dict[str, dict[str, Any]], list[tuple[Path, bool]]]:
    """The records ``load`` finds (by run path) and the runs that have none yet."""
    out: dict[str, dict[str, Any]] = {}
    todo = []
    for path, writable in runs:
        rec = load(path, writable)
        if rec is None:
            todo.append((Path(path), writable))
        else:
            out[str(path)] = rec
    return out, todo


def measure_runs(runs: Sequence[tuple[str | Path, bool]], settings: NetworkSettings, *,
                 progress: Progress | None = None, models: dict | None = None,
                 frozen: Any = None) -> dict[str, dict[str, Any]]:
    """Compute and store the CKA records of ``runs`` (``(path, writable)``; one frozen
    backbone and task for all) that have none yet; returns every run's record by path.

    ``models`` (path → trained model) and ``frozen`` ((model, task)) skip rebuilding what
    the caller already holds.
    """
    out, todo = _stored_or_todo(runs, lambda p, w: load_network(p, settings, writable=w))
    if not todo:
        return out
    specs = {FrozenSpec.of(run_config(p)) for p, _ in todo}
    if len(specs) > 1:
        raise ValueError("these runs start from different backbones or tasks; measure them "
                         "separately: " + ", ".join(p.name for p, _ in todo))
    (spec,) = specs
    step = progress or (lambda stage, done, total: None)
    t0 = time.perf_counter()
    trained = []
    for i, (p, _) in enumerate(todo):
        step("loading the models", i, len(todo) + 1)
        trained.append((models or {}).get(str(p)) or load_view_model(p))
    frozen_model, task = frozen if frozen is not None else load_frozen(spec)
    step("loading the models", len(todo) + 1, len(todo) + 1)
    data = split_dataset(task, frozen_model, spec.normalization, "test", settings.images)
    t1 = time.perf_counter()
    res = token_cka(frozen_model, [t.model for t in trained], data,
                    _batch_size(frozen_model, settings), progress)
    seconds = time.perf_counter() - t1
    meta = {"settings": settings.cka_key(), "layers": res["layers"], "images": len(data),
            "frozen": spec.key(), "seconds": round(seconds, 3),
            "load_seconds": round(t1 - t0, 3), "runs_together": len(todo),
            "computed": time.strftime("%Y-%m-%d %H:%M:%S")}
    records.save_npz(records.frozen_dir() / f"{spec.key()}-{_name('network', settings)}",
                     {"cls": res["frozen_cls"].astype(np.float16), "labels": res["labels"]},
                     meta)
    for j, (p, writable) in enumerate(todo):
        arrays = {"cka_tokens": res["cka_tokens"][j], "cka_cls": res["cka_cls"][j],
                  "cls": res["cls"][j].astype(np.float16), "labels": res["labels"]}
        run_meta = {**meta, "fingerprint": records.run_fingerprint(p), "run_id": p.name,
                    "method": trained[j].config["method"]}
        records.save_npz(records.run_dir(p, writable=writable) / _name("network", settings),
                         arrays, run_meta)
        out[str(p)] = {**run_meta, **arrays}
    return out


# -- linear separability ------------------------------------------------------------------
def layer_features(model, data, batch_size: int, progress: Progress | None = None,
                   stage: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """CLS features of every layer, (n × layers × d), and the labels."""
    from ...probes.representations import layer_tokens, summary_token

    feats, labels = [], []
    for x, y in batches(data, batch_size):
        feats.append(np.stack([summary_token(t, model).numpy() for t in layer_tokens(model, x)],
                              1))
        labels.append(y.numpy())
        if progress:
            progress(stage, sum(len(v) for v in labels), len(data))
    return np.concatenate(feats), np.concatenate(labels)


def separability(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                 test: tuple[np.ndarray, np.ndarray], cs: Sequence[float],
                 progress: Progress | None = None) -> dict[str, list]:
    """Per layer (axis 1 of the features): logistic regression on standardised features,
    C chosen on ``val`` (ties: the smaller C), accuracy on ``test``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    (xtr, ytr), (xva, yva), (xte, yte) = train, val, test
    if len(np.unique(ytr)) < 2:
        raise ValueError("a linear probe needs at least two classes in the train images")
    out: dict[str, list] = {"val_acc": [], "test_acc": [], "c": [], "train_acc": []}
    layers = xtr.shape[1]
    for i in range(layers):
        scaler = StandardScaler().fit(xtr[:, i].astype(np.float64))
        ftr, fva, fte = (scaler.transform(v[:, i].astype(np.float64)) for v in (xtr, xva, xte))
        # C from small to large, each fit starting from the previous solution
        clf = LogisticRegression(max_iter=1000, warm_start=True)
        best = None
        for C in sorted(float(v) for v in cs):
            clf.set_params(C=C).fit(ftr, ytr)
            scores = (float(clf.score(fva, yva)), C, float(clf.score(fte, yte)),
                      float(clf.score(ftr, ytr)))
            if best is None or scores[0] > best[0]:
                best = scores
        acc, C, test_acc, train_acc = best
        out["val_acc"].append(acc)
        out["c"].append(C)
        out["test_acc"].append(test_acc)
        out["train_acc"].append(train_acc)
        if progress:
            progress("fitting linear probes", i + 1, layers)
    return out


def fit_probes(runs: Sequence[tuple[str | Path, bool]], settings: NetworkSettings, *,
               progress: Progress | None = None, models: dict | None = None,
               frozen: Any = None) -> dict[str, dict[str, Any]]:
    """Linear separability per layer of ``runs`` and of their frozen backbone (stored as
    records); needs their CKA records (:func:`measure_runs`) for the test features. Returns
    the records by run path, the frozen one under ``"frozen"``."""
    out, todo = _stored_or_todo(runs, lambda p, w: load_probes(p, settings, writable=w))
    specs = {FrozenSpec.of(run_config(p)) for p, _ in runs}
    if len(specs) > 1:
        raise ValueError("these runs start from different backbones or tasks")
    (spec,) = specs
    frozen_rec = load_frozen_probes(spec, settings)
    if not todo and frozen_rec is not None:
        return {**out, "frozen": frozen_rec}
    step = progress or (lambda stage, done, total: None)
    nets = measure_runs(runs, settings, progress=progress, models=models, frozen=frozen)
    frozen_model, task = frozen if frozen is not None else load_frozen(spec)
    norm = spec.normalization
    tr = split_dataset(task, frozen_model, norm, "train", settings.probe_train)
    va = split_dataset(task, frozen_model, norm, "val", settings.probe_val)
    bs = _batch_size(frozen_model, settings)
    key = settings.probe_key()
    jobs: list[tuple[str, Any, np.ndarray, np.ndarray]] = []  # (label, model, test x, test y)
    if frozen_rec is None:
        fnet = load_frozen_network(spec, settings)
        if fnet is None:
            raise RuntimeError("the frozen backbone's CKA record is missing")
        jobs.append(("frozen", frozen_model, fnet["cls"], fnet["labels"]))
    for p, _ in todo:
        model = ((models or {}).get(str(p)) or load_view_model(p)).model
        jobs.append((str(p), model, nets[str(p)]["cls"], nets[str(p)]["labels"]))
    for n, (label, model, xte, yte) in enumerate(jobs):
        name = "frozen backbone" if label == "frozen" else Path(label).name
        where = f"{name} ({n + 1}/{len(jobs)})"

        def stage(what: str, where: str = where) -> Progress:
            return lambda _s, done, total: step(f"{where}: {what}", done, total)

        t0 = time.perf_counter()
        xtr, ytr = layer_features(model, tr, bs, stage("train features"))
        xva, yva = layer_features(model, va, bs, stage("validation features"))
        sep = separability((xtr, ytr), (xva, yva), (np.asarray(xte, np.float32), yte),
                           settings.probe_c, stage("fitting probes"))
        rec = {"settings": key, "layers": nets[next(iter(nets))]["layers"], **sep,
               "train_images": len(tr), "val_images": len(va), "test_images": len(yte),
               "seconds": round(time.perf_counter() - t0, 3),
               "computed": time.strftime("%Y-%m-%d %H:%M:%S")}
        if label == "frozen":
            records.save_json(records.frozen_dir()
                              / f"{spec.key()}-{_name('probes', settings)}", rec)
            frozen_rec = rec
        else:
            writable = dict((str(p), w) for p, w in todo)[label]
            rec["fingerprint"] = records.run_fingerprint(label)
            records.save_json(records.run_dir(label, writable=writable)
                              / _name("probes", settings), rec)
            out[label] = rec
    return {**out, "frozen": frozen_rec}


# -- 2-D embeddings -----------------------------------------------------------------------
EMBEDDINGS = ("pca", "tsne")


def embed_2d(features: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(n × 2) coordinates of (n × d) features: PCA, or t-SNE (perplexity ≤ 30, PCA init)."""
    x = np.asarray(features, dtype=np.float64)
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed
                    ).fit_transform(x)
    raise ValueError(f"unknown embedding {method!r}; known: {', '.join(EMBEDDINGS)}")
