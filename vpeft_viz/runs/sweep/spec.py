"""A sweep spec (a TOML file) and its expansion into run configs (format: docs/sweeps.md).

::

    name = "lora-vs-linear"              # the sweep's identity in the store (default: file stem)
    tasks = ["digits", "count"]          # embedded task names, embedded:<task> or folders
    methods = ["linear", "lora"]
    seeds = [0, 1, 2]
    backbones = ["vit_tiny_patch4_32_vpeft"]   # optional (default: the embedded backbone)
    pretrained = true                    # optional, like train's --random-init inverted
    normalization = "backbone"           # optional
    checkpoint = "weights.safetensors"   # optional (offline weights; relative to this file)

    [train]                              # like --train-set; a list is a grid axis
    epochs = 10
    lr = [0.001, 0.003]

    [set.lora]                           # like --set for one method; a list is a grid axis
    rank = [4, 8]

    [ray]                                # resources of one run on a Ray cluster
    num_cpus = 1
    num_gpus = 0.25                      # fractional: four runs share one GPU
    max_retries = 2                      # re-runs of a run whose worker died

The grid is backbones × tasks × methods × (that method's ``[set.<method>]`` grid) ×
``[train]`` grid × seeds, in that order. Every expanded run is validated by
``execute.make_run_config`` (today's defaults filled in) before anything is written, and
every mistake is an error naming the file and the key.
"""

from __future__ import annotations

import itertools
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...config import ConfigError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
TOP_KEYS = ("name", "tasks", "methods", "seeds", "backbones", "pretrained", "normalization",
            "checkpoint", "train", "set", "ray")
RAY_KEYS = ("num_cpus", "num_gpus", "max_retries")


class SpecError(ConfigError):
    """A sweep spec that cannot be expanded; the message names the file and the key."""


@dataclass(frozen=True)
class RayOptions:
    """What one run asks of a Ray cluster (``[ray]``)."""

    num_cpus: float = 1.0  # also the run's torch threads (at least 1)
    num_gpus: float = 0.0  # fractional: several small runs share one GPU
    max_retries: int = 2  # re-runs of a run whose worker process (or node) died

    @property
    def threads(self) -> int:
        return max(1, int(self.num_cpus))


@dataclass
class SweepSpec:
    """A parsed spec: the lists of the grid and the fixed options."""

    name: str
    tasks: list[str]  # data specs (embedded:<task> or folder paths)
    methods: list[str]
    seeds: list[int]
    backbones: list[str | None] = field(default_factory=lambda: [None])
    pretrained: bool = True
    normalization: str = "backbone"
    checkpoint: str | None = None
    train: dict[str, list[Any]] = field(default_factory=dict)  # key → grid values
    settings: dict[str, dict[str, list[Any]]] = field(default_factory=dict)  # method → grid
    ray: RayOptions = field(default_factory=RayOptions)
    source: str = "<spec>"
    raw: dict[str, Any] = field(default_factory=dict)  # the file as read (for the manifest)


@dataclass
class PlannedRun:
    """One run of the grid: what varies, and the validated config it becomes."""

    backbone: str
    data: str
    method: str
    seed: int
    method_settings: dict[str, Any]
    train_settings: dict[str, Any]  # from [train], seed excluded
    config: dict[str, Any]
    config_hash: str

    @property
    def task(self) -> str:
        return str(self.config["data"]["name"])

    @property
    def run_id(self) -> str:
        """Deterministic: the same config in any sweep gets the same directory name."""
        slug = re.sub(r"[^A-Za-z0-9.-]+", "-", f"{self.method}-{self.task}").strip("-")[:60]
        return f"{slug or 'run'}-s{self.seed}-{self.config_hash[:10]}"

    @property
    def label(self) -> str:
        parts = [f"{k}={v}" for k, v in {**self.method_settings, **self.train_settings}.items()]
        extra = f" ({', '.join(parts)})" if parts else ""
        return f"{self.method} on {self.task}{extra}, seed {self.seed}"

    def entry(self) -> dict[str, Any]:
        """What the sweep manifest records for this run (docs/run-store.md, "Sweeps")."""
        return {"run_id": self.run_id, "config_hash": self.config_hash,
                "backbone": self.backbone, "data": self.data, "task": self.task,
                "method": self.method, "seed": self.seed,
                "set": dict(self.method_settings), "train": dict(self.train_settings)}


# -- reading ----------------------------------------------------------------------------------
def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a TOML sweep spec (errors name the file and the key)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"sweep spec not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"cannot read sweep spec {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from None
    return parse_spec(raw, source=str(path), default_name=path.stem,
                      base=path.resolve().parent)


def _list(raw: dict[str, Any], key: str, where: str, kind: type | tuple[type, ...],
          *, required: bool = True) -> list[Any] | None:
    if key not in raw:
        if required:
            raise SpecError(f"{where}: missing {key!r} (a list)")
        return None
    value = raw[key]
    if not isinstance(value, list):
        value = [value]
    if not value:
        raise SpecError(f"{where}: {key!r} is an empty list")
    for v in value:
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
            raise SpecError(f"{where}: every entry of {key!r} must be a {names}; got {v!r}")
    duplicates = sorted({str(v) for v in value if value.count(v) > 1})
    if duplicates:
        raise SpecError(f"{where}: {key!r} lists {', '.join(duplicates)} more than once")
    return value


def _grid(table: Any, where: str) -> dict[str, list[Any]]:
    """A ``[train]`` or ``[set.<method>]`` table: each value a scalar or a list of scalars."""
    if not isinstance(table, dict):
        raise SpecError(f"{where} must be a table of settings (key = value or [values])")
    out: dict[str, list[Any]] = {}
    for key, value in table.items():
        values = value if isinstance(value, list) else [value]
        if not values:
            raise SpecError(f"{where}: {key!r} is an empty list")
        for v in values:
            if not isinstance(v, (bool, int, float, str)):
                raise SpecError(f"{where}: {key!r} values must be numbers, strings or "
                                f"booleans; got {v!r}")
            if isinstance(v, float) and not math.isfinite(v):
                raise SpecError(f"{where}: {key!r} must be finite; got {v!r}")
        keys = [repr(v) for v in values]
        if len(set(keys)) < len(keys):
            raise SpecError(f"{where}: {key!r} lists a value more than once: {values!r}")
        out[key] = values
    return out


def _path(value: str, base: Path | None) -> str:
    """A path of the spec, absolute: a relative one is relative to the spec file's folder
    (every node of a cluster then reads the same absolute path)."""
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    return str(path.resolve()) if base is not None else value


def _data_spec(task: str, where: str, base: Path | None) -> str:
    """``digits`` → ``embedded:digits`` when it names an embedded task; a folder → its
    absolute path."""
    from ...data.embedded import EMBEDDED_TASKS, OPTIONAL_TASKS

    if task.startswith("embedded:"):
        return task
    if "/" not in task and (task in EMBEDDED_TASKS or task in OPTIONAL_TASKS):
        return f"embedded:{task}"
    if "/" not in task and not (base or Path()).joinpath(task).exists():
        names = ", ".join([*EMBEDDED_TASKS, *OPTIONAL_TASKS])
        raise SpecError(f"{where}: task {task!r} is neither an embedded task ({names}) nor a "
                        "folder")
    return _path(task, base)


def parse_spec(raw: dict[str, Any], *, source: str = "<spec>", default_name: str | None = None,
               base: Path | None = None) -> SweepSpec:
    """Check a spec read from TOML (a dict) and return it; nothing is built yet. Relative
    folder and checkpoint paths are taken relative to ``base`` (the spec file's folder)."""
    from ...methods import method_names

    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise SpecError(f"{source}: unknown key(s) {', '.join(unknown)}; known: "
                        f"{', '.join(TOP_KEYS)}")
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise SpecError(f"{source}: name must be letters, digits, '.', '_' or '-' (starting "
                        f"with a letter or digit); got {name!r}")
    tasks = [_data_spec(t, source, base) for t in _list(raw, "tasks", source, str)]
    methods = _list(raw, "methods", source, str)
    known = method_names()
    for m in methods:
        if m not in known:
            raise SpecError(f"{source}: methods: unknown method {m!r}; known: "
                            f"{', '.join(known)}")
    seeds = _list(raw, "seeds", source, int)
    if any(s < 0 for s in seeds):
        raise SpecError(f"{source}: seeds must be non-negative integers; got {seeds}")
    backbones = _list(raw, "backbones", source, str, required=False) or [None]
    pretrained = raw.get("pretrained", True)
    if not isinstance(pretrained, bool):
        raise SpecError(f"{source}: pretrained must be true or false; got {pretrained!r}")
    normalization = raw.get("normalization", "backbone")
    checkpoint = raw.get("checkpoint")
    for key, value in (("normalization", normalization), ("checkpoint", checkpoint)):
        if value is not None and not isinstance(value, str):
            raise SpecError(f"{source}: {key} must be a string; got {value!r}")
    if checkpoint is not None:
        checkpoint = _path(checkpoint, base)

    train = _grid(raw.get("train", {}), f"{source}: [train]")
    if "seed" in train:
        raise SpecError(f"{source}: [train] must not set seed: list the seeds in `seeds`")
    settings_raw = raw.get("set", {})
    if not isinstance(settings_raw, dict):
        raise SpecError(f"{source}: set must hold one table per method, e.g. [set.lora]")
    settings: dict[str, dict[str, list[Any]]] = {}
    for method, table in settings_raw.items():
        if method not in methods:
            raise SpecError(f"{source}: [set.{method}]: {method!r} is not among the methods "
                            f"({', '.join(methods)})")
        settings[method] = _grid(table, f"{source}: [set.{method}]")
    return SweepSpec(name=name, tasks=tasks, methods=methods, seeds=seeds, backbones=backbones,
                     pretrained=pretrained, normalization=normalization, checkpoint=checkpoint,
                     train=train, settings=settings, ray=_ray_options(raw.get("ray", {}), source),
                     source=source, raw=raw)


def _ray_options(table: Any, source: str) -> RayOptions:
    if not isinstance(table, dict):
        raise SpecError(f"{source}: ray must be a table ([ray])")
    unknown = sorted(set(table) - set(RAY_KEYS))
    if unknown:
        raise SpecError(f"{source}: [ray]: unknown key(s) {', '.join(unknown)}; known: "
                        f"{', '.join(RAY_KEYS)}")
    opts = RayOptions(**table)
    for key in ("num_cpus", "num_gpus"):
        v = getattr(opts, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise SpecError(f"{source}: [ray] {key} must be a number ≥ 0; got {v!r}")
    if opts.num_cpus < 1 and opts.num_gpus == 0:
        raise SpecError(f"{source}: [ray] num_cpus must be at least 1 for a CPU run; got "
                        f"{opts.num_cpus}")
    if opts.num_gpus > 1 and opts.num_gpus != int(opts.num_gpus):
        raise SpecError(f"{source}: [ray] num_gpus above 1 must be a whole number; got "
                        f"{opts.num_gpus}")
    if (isinstance(opts.max_retries, bool) or not isinstance(opts.max_retries, int)
            or not 0 <= opts.max_retries <= 100):
        raise SpecError(f"{source}: [ray] max_retries must be an integer in [0, 100]; got "
                        f"{opts.max_retries!r}")
    return RayOptions(float(opts.num_cpus), float(opts.num_gpus), int(opts.max_retries))


# -- expansion --------------------------------------------------------------------------------
def _combinations(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def expand(spec: SweepSpec) -> list[PlannedRun]:
    """Every run of the grid with its validated config, in grid order.

    A config that does not validate (an unknown setting, a value out of range, a backbone
    that does not exist, an unreadable image) is an error naming the spec file, the run and
    the reason; two grid points that make the same run are an error too.
    """
    from ...data import check_task_files
    from ..execute import make_run_config
    from ..recipe import config_hash

    data_checked: dict[tuple[str, int], list[str]] = {}  # each task's files are checked once
    out: list[PlannedRun] = []
    seen: dict[str, str] = {}
    for backbone, data, method in itertools.product(spec.backbones, spec.tasks, spec.methods):
        for method_settings in _combinations(spec.settings.get(method, {})):
            for train_settings in _combinations(spec.train):
                for seed in spec.seeds:
                    where = (f"{spec.source}: {method} on {data}"
                             + "".join(f", {k}={v}" for k, v in
                                       {**method_settings, **train_settings}.items())
                             + f", seed {seed}")
                    try:
                        if (data, seed) not in data_checked:
                            data_checked[(data, seed)] = check_task_files(data, seed=seed)
                        config = make_run_config(
                            method=method, data=data, backbone=backbone,
                            method_config=method_settings, train={**train_settings,
                                                                  "seed": seed},
                            checkpoint=spec.checkpoint, pretrained=spec.pretrained,
                            normalization=spec.normalization,
                            data_warnings=data_checked[(data, seed)])
                    except SpecError:
                        raise
                    except Exception as e:  # ConfigError, DataError, UnknownTaskError...
                        raise SpecError(f"{where}: {e}") from None
                    run = PlannedRun(backbone=config["backbone"]["name"], data=data,
                                     method=method, seed=seed,
                                     method_settings=method_settings,
                                     train_settings=train_settings, config=config,
                                     config_hash=config_hash(config))
                    if run.config_hash in seen:
                        raise SpecError(f"{where}: the same run as {seen[run.config_hash]} "
                                        "(two grid values give one config)")
                    seen[run.config_hash] = where
                    out.append(run)
    return out
