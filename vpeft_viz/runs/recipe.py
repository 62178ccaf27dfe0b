"""When two runs are the same experiment: the recipe of a run config and its hash.

A run config (``execute.make_run_config``) records what was asked and also where and with
what it ran (``versions``, data ``warnings``, the data's display name). Two configs are the
same experiment when their *recipes* are equal: the method and every one of its settings,
the backbone (name, pretrained, checkpoint, and the fingerprint of the weights it started
from: a run on other embedded weights is another experiment), the data (spec and
normalisation) and the whole training recipe, seed, device and learning rate included.
Configs are built with today's defaults filled in, so a run made under an older default is
a different recipe; a training setting *added* since a run was made is read as its default
(which reproduces what the run did), and what older configs left implicit is made explicit
(:func:`canonical_config`: a null learning rate is the method's default of the day, missing
backbone weights are the first embedded ones).

``cached.py`` keeps a shipped run only when its recipe equals what the recipe would create
now; a sweep (``runs/sweep``) skips a planned run when a finished run of the store has the
same :func:`config_hash`. Format: docs/run-store.md ("Sweeps").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from ..weights import recorded_weights_id

RECIPE_FIELDS = ("method", "method_config", "backbone", "train")  # whole entries of config.json
DATA_FIELDS = ("spec", "normalization")  # the entries of config["data"] that define the data


def _train_recipe(train: Any) -> Any:
    """A stored training recipe with settings added since it was made read as their defaults
    (which reproduce what such a run did, e.g. ``shots`` unset: the whole split)."""
    from ..config import ConfigError
    from ..train import TrainConfig

    if not isinstance(train, Mapping):
        return train
    try:
        return TrainConfig.from_dict(dict(train)).to_dict()
    except (ConfigError, TypeError, ValueError):  # a setting since removed: compared as is
        return dict(train)


# The methods' default learning rates while run configs stored ``train.lr = null`` for "the
# method's default" (until 2026-12-01): a null lr in a stored config means these. Configs
# made since record the learning rate they used, so a later change of a default does not
# change what an old run says it did.
LEGACY_DEFAULT_LR = {"linear": 1e-2, "full": 1e-4}
LEGACY_DEFAULT_LR_OTHERS = 1e-3


def canonical_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with what older runs left implicit made explicit: the backbone weights
    (:func:`..backbones.recorded_weights_id`) and a null learning rate (the method's default
    of the day, :data:`LEGACY_DEFAULT_LR`)."""
    out = dict(config)
    bb = out.get("backbone")
    if isinstance(bb, Mapping) and "weights" not in bb:
        out["backbone"] = {**bb, "weights": recorded_weights_id(bb)}
    train = out.get("train")
    if isinstance(train, Mapping) and train.get("lr") is None:
        lr = LEGACY_DEFAULT_LR.get(out.get("method"), LEGACY_DEFAULT_LR_OTHERS)
        out["train"] = {**train, "lr": lr}
    return out


def recipe(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a run config that defines the experiment (see the module docstring)."""
    config = canonical_config(config)
    data = config.get("data") or {}
    out = {k: config.get(k) for k in RECIPE_FIELDS}
    out["train"] = _train_recipe(out["train"])
    out["data"] = {k: data.get(k) for k in DATA_FIELDS}
    return out


def same_recipe(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return recipe(a) == recipe(b)


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the recipe as canonical JSON: equal for the same experiment."""
    text = json.dumps(recipe(config), sort_keys=True, separators=(",", ":"), allow_nan=False,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()
