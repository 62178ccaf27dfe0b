"""Source runs: the finished runs a method starts from (PVP's pre-trained prompts).

A method that starts from another run's weights says so in
:meth:`~vpeft_viz.methods.PeftMethod.source_request` (the source's method and shape-defining
settings, and either a run named by id or directory, or nothing: the default source). Before
the method is attached, :func:`start_from_source` finds that run, or trains the default one,
and passes its stored weights to the method's ``load_source``.

* A **named run** is looked up by id in the run's own store, the user store and the shipped
  ``cached_runs/``, or opened as a directory. It must be finished, trained with the source's
  method (or the requesting method itself), on the same backbone, with the same
  shape-defining settings; :func:`check_source` says what differs before a run is created.
* The **default source** is the requested method trained by the lab on every *other* task of
  the embedded suite pooled (``embedded:pool-except-<task>``; ``embedded:pool`` when the run's
  data is not a default-suite task), with the run's backbone and normalisation, the
  request's epochs and seed, otherwise the default recipe. It is an ordinary run of the run's
  own store, under an id that names the pool and hashes its settings
  (``pool-except-digits-vpt-deep-s0-<10 hex>``): trained on first use (the run's progress
  shows phase ``source``), found again afterwards — in the shipped store too, where the
  cached-run recipe puts the sources of the shipped runs. Its training is reproducible: the
  same settings give the same run wherever it is trained first.

The run that starts from a source records the source's identity (run id, where it was
found, method, data, backbone, settings, accuracy, a SHA-256 of its weights) in its
``method_state.json`` and the source's id in its summary (docs/run-store.md).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..methods import create_method
from ..train import Callback, Cancelled
from ..weights import recorded_weights_id
from .store import Run, RunStore, RunStoreError

# What makes two default-source runs the same (the key hashed into the run id); the device
# and the evaluation batch size do not change what is trained.
_IGNORED_TRAIN = ("device", "eval_batch_size")
WAIT_POLL_S = 2.0
ABANDONED_AFTER_S = 120.0  # a source left queued this long by another process is retrained


def _request(cfg: dict[str, Any]):
    return create_method(cfg["method"], cfg["method_config"]).source_request()


def _stores(own: RunStore | None) -> list[RunStore]:
    """Where a source is looked for: the run's own store, the user store, the shipped one."""
    from . import CACHED_STORE, user_store_path

    out = [own] if own is not None else []
    for store in (RunStore(user_store_path()), RunStore(CACHED_STORE, read_only=True)):
        if all(store.root.resolve() != s.root.resolve() for s in out):
            out.append(store)
    return out


def _default_stores(own: RunStore) -> list[RunStore]:
    """Where a default source is looked for: the run's own store (where it is trained when
    missing), then the shipped one; a run of another store never starts from the user's."""
    from . import CACHED_STORE

    shipped = RunStore(CACHED_STORE, read_only=True)
    return [own] + ([shipped] if shipped.root.resolve() != own.root.resolve() else [])


def _where(run: Run, own: RunStore | None) -> str:
    """How a run's location is recorded: ``same store``, ``user``, ``shipped`` or its path."""
    from . import CACHED_STORE, user_store_path

    parent = run.path.parent.resolve()
    if own is not None and parent == own.root.resolve():
        return "same store"
    if parent == Path(user_store_path()).resolve():
        return "user"
    if parent == Path(CACHED_STORE).resolve():
        return "shipped"
    return str(run.path.resolve())


# -- named source runs ----------------------------------------------------------------------
def find_run(ref: str, own: RunStore | None = None) -> Run:
    """The run ``ref`` names: a run directory, or a run id in the run's own store, the user
    store or the shipped store (first found)."""
    path = Path(ref).expanduser()
    if "/" in ref or path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"source {ref!r}: not a run directory (no config.json)")
        return Run(path, read_only=True)
    for store in _stores(own):
        try:
            return Run(store.get(ref).path, read_only=True)
        except RunStoreError:
            continue
    raise ConfigError(f"source {ref!r}: no run of that id in "
                      f"{', '.join(str(s.root) for s in _stores(own))}; give a finished run's "
                      "id (`python -m vpeft_viz runs`) or its directory")


def _check_named(src: Run, cfg: dict[str, Any], request) -> None:
    """Refuse a named source that cannot serve ``cfg``, saying what differs."""
    try:
        scfg, status = src.config, src.status().get("status")
    except RunStoreError as e:
        raise ConfigError(f"source run {src.id} cannot be read: {e}") from None
    if status != "done":
        raise ConfigError(f"source run {src.id} is {status}, not done; wait for it to finish "
                          "or pick a finished run")
    allowed = (request.method, cfg["method"])
    if scfg.get("method") not in allowed:
        raise ConfigError(f"source run {src.id} is a {scfg.get('method')} run; "
                          f"{cfg['method']} starts from a {' or '.join(dict.fromkeys(allowed))} "
                          "run")
    have, want = scfg.get("backbone", {}), cfg["backbone"]
    for key in ("name", "checkpoint", "pretrained"):
        if have.get(key) != want.get(key):
            raise ConfigError(f"source run {src.id} was trained on backbone "
                              f"{have.get('name')} ({key}={have.get(key)!r}); this run uses "
                              f"{want.get('name')} ({key}={want.get(key)!r})")
    if recorded_weights_id(have) != recorded_weights_id(want):
        raise ConfigError(f"source run {src.id} was trained on backbone weights "
                          f"{recorded_weights_id(have)}; this run starts from "
                          f"{recorded_weights_id(want)} (retrain the source run on these)")
    settings = scfg.get("method_config", {})
    for key, value in request.method_config.items():
        if settings.get(key) != value:
            raise ConfigError(f"source run {src.id} has {key}={settings.get(key)!r}; this run "
                              f"asks for {key}={value!r} (set {cfg['method']}.{key}="
                              f"{settings.get(key)} to start from it)")
    if not src.weights_path.is_file():
        raise ConfigError(f"source run {src.id} has no stored weights (not shipped?)")


def check_source(cfg: dict[str, Any]) -> None:
    """Fail before a run exists when the named source of a run config cannot serve it."""
    request = _request(cfg)
    if request is not None and request.run is not None:
        _check_named(find_run(request.run), cfg, request)


# -- the default source ---------------------------------------------------------------------
def _key(cfg: dict[str, Any]) -> dict[str, Any]:
    train = {k: v for k, v in cfg["train"].items() if k not in _IGNORED_TRAIN}
    return {"method": cfg["method"], "method_config": cfg["method_config"],
            "backbone": cfg["backbone"], "data": cfg["data"]["spec"],
            "normalization": cfg["data"].get("normalization"), "train": train}


def default_source(cfg: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(run id, run config) of the default source run ``cfg`` starts from; None when it
    starts from none or from a named run."""
    from ..data import EMBEDDED_PREFIX
    from ..data.embedded import EMBEDDED_TASKS
    from ..data.embedded.pool import pool_name
    from .execute import make_run_config

    request = _request(cfg)
    if request is None or request.run is not None:
        return None
    spec = cfg["data"]["spec"]
    task = spec[len(EMBEDDED_PREFIX):] if spec.startswith(EMBEDDED_PREFIX) else None
    pool = pool_name(task if task in EMBEDDED_TASKS else None)
    bb, train = cfg["backbone"], cfg["train"]
    config = make_run_config(
        method=request.method, data=EMBEDDED_PREFIX + pool, backbone=bb["name"],
        checkpoint=bb.get("checkpoint"), pretrained=bb.get("pretrained", True),
        method_config=request.method_config,
        normalization=cfg["data"].get("normalization", "backbone"),
        train={"epochs": request.epochs, "seed": request.seed,
               "device": train.get("device", "auto"), "precision": train.get("precision", "auto")})
    digest = hashlib.sha256(json.dumps(_key(config), sort_keys=True, default=str).encode())
    return f"{pool}-{request.method}-s{request.seed}-{digest.hexdigest()[:10]}", config


class _SourceProgress(Callback):
    """Mirrors the source's training into the waiting run's progress; relays its cancel."""

    def __init__(self, outer: Run, source_id: str, every_s: float = 0.5):
        self.outer, self.source_id, self.every_s, self._last = outer, source_id, every_s, 0.0

    def on_start(self, info: dict) -> None:
        self.outer.update_progress(phase="source", source_run=self.source_id, source_step=0,
                                   source_steps=info["steps"])

    def on_step(self, step: int, total_steps: int, loss: float) -> None:
        now = time.perf_counter()
        if now - self._last >= self.every_s or step == total_steps:
            self._last = now
            self.outer.update_progress(source_step=step, source_steps=total_steps)

    def should_stop(self) -> bool:
        return self.outer.cancel_requested()


class _Labelled(Callback):
    """Another callback (a progress bar) told that this training is the source's."""

    def __init__(self, inner: Callback, label: str):
        self.inner, self.label = inner, label

    def on_start(self, info: dict) -> None:
        self.inner.on_start({**info, "label": self.label})

    def on_step(self, step: int, total_steps: int, loss: float) -> None:
        self.inner.on_step(step, total_steps, loss)

    def on_epoch(self, row: dict) -> None:
        self.inner.on_epoch(row)

    def should_stop(self) -> bool:
        return self.inner.should_stop()


def _same_settings(run: Run, config: dict[str, Any]) -> bool:
    try:
        return _key(run.config) == _key(config)
    except (RunStoreError, KeyError):
        return False


def _train_or_wait(store: RunStore, source_id: str, config: dict[str, Any], outer: Run,
                   callbacks: list[Callback]) -> Run:
    """The default source in ``store``: trained here, or waited for while another process
    trains it; a failed or abandoned attempt is removed and trained again."""
    from .execute import execute_run
    from .queue import try_claim

    while True:
        try:
            src = store.create(config, run_id=source_id)
        except FileExistsError:
            src = store.get(source_id)
            if not _same_settings(src, config):
                raise RuntimeError(f"run {source_id} in {store.root} is not the source this run "
                                   "needs (other settings); remove it") from None
            status = src.status()
            state = status.get("status")
            if state == "done":
                return src
            stale = state == "queued" and time.time() - float(
                status.get("created") or 0) > ABANDONED_AFTER_S
            if state in ("failed", "cancelled") or stale:
                shutil.rmtree(src.path, ignore_errors=True)
                continue
            progress = status.get("progress", {})
            outer.update_progress(phase="source", source_run=source_id,
                                  source_step=progress.get("step"),
                                  source_steps=progress.get("steps"))
            if outer.cancel_requested():
                raise Cancelled("cancelled while waiting for the source run "
                                f"{source_id}") from None
            time.sleep(WAIT_POLL_S)
            continue
        try_claim(src, "source")  # no queue worker takes it: this process trains it
        label = f"source {source_id}"
        try:
            summary = execute_run(src, callbacks=[_SourceProgress(outer, source_id),
                                                  *(_Labelled(cb, label) for cb in callbacks)])
        except BaseException as e:
            raise RuntimeError(f"training the source run {source_id} failed "
                               f"({type(e).__name__}: {e})") from e
        if summary.get("cancelled"):
            why = src.status().get("error") or "cancel requested"
            raise Cancelled(f"cancelled while training the source run {source_id} ({why})")
        return src


def weights_digest(weights: dict[str, Any]) -> str:
    """SHA-256 of a run's stored tensors (names and float32 bytes, in name order)."""
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def start_from_source(run: Run, method, callbacks: list[Callback] | None = None
                      ) -> dict[str, Any] | None:
    """Find (or train) the source ``method`` asks for and load it into ``method``; returns
    the source's identity, or None when the method starts from no source."""
    request = method.source_request()
    if request is None:
        return None
    cfg = run.config
    own = RunStore(run.path.parent)
    run.update_progress(phase="source")
    if request.run is not None:
        src = find_run(request.run, own)
        _check_named(src, cfg, request)
        trained = False
    else:
        source_id, config = default_source(cfg)
        src = None
        for store in _default_stores(own):
            try:
                found = store.get(source_id)
            except RunStoreError:
                continue
            if found.status().get("status") == "done" and _same_settings(found, config):
                src = found
                break
        trained = src is None
        if src is None:
            src = _train_or_wait(own, source_id, config, run, list(callbacks or []))
    weights = Run(src.path, read_only=True).load_weights()
    scfg, summary = src.config, src.summary() or {}
    identity = {
        "run_id": src.id, "store": _where(src, own), "default": request.run is None,
        "trained_now": trained, "method": scfg.get("method"),
        "data": scfg.get("data", {}).get("spec"), "backbone": scfg.get("backbone", {}).get("name"),
        "method_config": scfg.get("method_config"),
        "epochs": scfg.get("train", {}).get("epochs"), "seed": scfg.get("train", {}).get("seed"),
        "val_acc": summary.get("val_acc"), "test_acc": summary.get("test_acc"),
        "weights_sha256": weights_digest(weights)}
    method.load_source(weights, identity)
    return identity
