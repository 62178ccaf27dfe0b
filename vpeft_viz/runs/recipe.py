"""When two runs are the same experiment: the recipe of a run config and its hash.

A run config (``execute.make_run_config``) records what was asked and also where and with
what it ran (``versions``, data ``warnings``, the data's display name). Two configs are the
same experiment when their *recipes* are equal: the method and every one of its settings,
the backbone (name, pretrained, checkpoint, and the fingerprint of the weights it started
from: a run on other embedded weights is another experiment), the data (spec and normalisation) and the whole
training recipe, seed and device included. Configs are built with today's defaults filled
in, so a run made under an older default is a different recipe; a training setting *added*
since a run was made is read as its default (which reproduces what the run did).

``cached.py`` keeps a shipped run only when its recipe equals what the recipe would create
now; a sweep (``runs/sweep``) skips a planned run when a finished run of the store has the
same :func:`config_hash`. Format: docs/run-store.md ("Sweeps").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

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


def recipe(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a run config that defines the experiment (see the module docstring)."""
    data = config.get("data") or {}
    out = {k: config.get(k) for k in RECIPE_FIELDS}
    out["train"] = _train_recipe(out["train"])
    if isinstance(out["backbone"], Mapping):  # runs made before weights were recorded
        from ..backbones import recorded_weights_id

        out["backbone"] = {**out["backbone"], "weights": recorded_weights_id(out["backbone"])}
    out["data"] = {k: data.get(k) for k in DATA_FIELDS}
    return out


def same_recipe(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return recipe(a) == recipe(b)


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the recipe as canonical JSON: equal for the same experiment."""
    text = json.dumps(recipe(config), sort_keys=True, separators=(",", ":"), allow_nan=False,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()
