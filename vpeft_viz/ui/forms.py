"""Form widgets of the Train page: config dataclasses as forms, backbone and data pickers.

A method's (or the training recipe's) form is generated from its :class:`~vpeft_viz.config.Config`
dataclass: each :class:`~vpeft_viz.config.FieldSpec` becomes one widget (choices → select box,
bool → checkbox, int/float → number box, optional → text box where empty means "default"),
and the values go back through the dataclass, so a bad value gets the same error, naming the
field and its allowed range, as on the command line. Number boxes are deliberately left
unbounded: a bounded box refuses an out-of-range entry in the browser (it turns red) and keeps
sending the old value, so the page would queue a value the user no longer sees; unbounded,
the value reaches the check and blocks the launch. Every widget is bound to the URL's query
parameters (``bind="query-params"``), so a reload keeps the form and a link shares it.
Pickers return what :func:`vpeft_viz.runs.execute.make_run_config` takes, plus an error
message when the choice cannot be used as it stands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import streamlit as st

from ..backbones import (
    EMBEDDED_BACKBONE,
    BackboneError,
    check_backbone_name,
    check_checkpoint,
    hub_reachable,
    hub_weights_cached,
)
from ..config import Config, ConfigError, FieldSpec, parse_value
from ..data import EMBEDDED_PREFIX, DataError
from ..data.dataset import NORMALIZATIONS
from .common import embedded_info, hardware

MAX_SEEDS = 16
BIND = "query-params"  # every form widget lives in the URL: a reload keeps the form
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
FORMAT_LABELS = {"vtab": "VTAB-1k task folder", "fgvc": "FGVC folder (VPT JSON splits)",
                 "imagefolder": "ImageFolder (split here by seed: 70/10/20 per class)"}
NORMALIZATION_HELP = {
    "backbone": "the statistics the backbone was pretrained with (what it expects)",
    "imagenet": "ImageNet mean/std whatever the backbone (what NOAH and V-PETL Bench do)",
    "none": "raw pixels in [0, 1]",
}


@dataclass
class Choice:
    """What a form or picker produced: values to use, and errors that block a launch."""

    values: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


# -- config dataclasses as forms ------------------------------------------------------------
def _float_step(spec: FieldSpec) -> float:
    """A step that moves the default by about one unit of its leading digit."""
    x = float(spec.default or 0.0)
    if x:
        return 10.0 ** math.floor(math.log10(abs(x)))
    if spec.min is not None and spec.max is not None and spec.max > spec.min:
        return 10.0 ** math.floor(math.log10((spec.max - spec.min) / 100))
    return 0.01


def _field_help(spec: FieldSpec) -> str:
    lo, hi = spec.min, spec.max
    if lo is None and hi is None:
        return spec.help
    rng = f"{'-∞' if lo is None else f'{lo:g}'} … {'∞' if hi is None else f'{hi:g}'}"
    return f"{spec.help} Allowed: {rng}."


def field_widget(config_cls: type[Config], spec: FieldSpec, key: str) -> Any:
    """One widget for one field; returns its value (already parsed for text boxes).

    Number boxes are not bounded here (see the module docstring): the range is checked by
    the config class, whose error blocks the launch.
    """
    label, helptext = spec.name, _field_help(spec)
    if spec.choices is not None:
        options = list(spec.choices)
        return st.selectbox(label, options, index=options.index(spec.default), help=helptext,
                            key=key, bind=BIND)
    if spec.type is bool:
        return st.checkbox(label, value=bool(spec.default), help=helptext, key=key, bind=BIND)
    if config_cls._optional_field(spec.name) or spec.type is str:
        raw = st.text_input(label, value="" if spec.default is None else str(spec.default),
                            placeholder="empty: default", help=helptext, key=key, bind=BIND)
        where = f"{config_cls.prefix}.{spec.name}"
        return parse_value(where, spec.type, raw, config_cls._optional_field(spec.name))
    if spec.type is int:
        return st.number_input(label, value=int(spec.default), step=1, help=helptext, key=key,
                               bind=BIND)
    return st.number_input(label, value=float(spec.default), step=_float_step(spec),
                           format="%g", help=helptext, key=key, bind=BIND)


def config_form(config_cls: type[Config], *, key: str, exclude: tuple[str, ...] = (),
                columns: int = 3) -> Choice:
    """Widgets for every field of ``config_cls`` (except ``exclude``), checked by the class.

    Returns the field values (excluded fields left out); every problem is shown with
    ``st.error`` and listed in ``errors`` so the caller can block a launch.
    """
    specs = [s for s in config_cls.field_specs() if s.name not in exclude]
    out = Choice()
    if not specs:
        st.caption("No settings.")
        return out
    cols = st.columns(min(columns, len(specs)))
    for i, spec in enumerate(specs):
        with cols[i % len(cols)]:
            try:
                out.values[spec.name] = field_widget(config_cls, spec, f"{key}.{spec.name}")
            except ConfigError as e:
                out.errors.append(str(e))
    if not out.errors and not exclude:
        try:
            config_cls.from_dict(out.values)
        except ConfigError as e:
            out.errors.append(str(e))
    for e in out.errors:
        st.error(e, icon=":material/error:")
    return out


def check_config(config_cls: type[Config], values: dict[str, Any]) -> str | None:
    """The error of building ``config_cls`` from ``values``, shown under the form; or None."""
    try:
        config_cls.from_dict(values)
    except ConfigError as e:
        st.error(str(e), icon=":material/error:")
        return str(e)
    return None


def parse_seeds(text: str) -> list[int]:
    """``"0, 1, 2"`` or ``"0-2"`` → ``[0, 1, 2]`` (distinct, order kept, at most MAX_SEEDS)."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.replace(";", ",").split(",")):
        if not part:
            continue
        try:
            if "-" in part.lstrip("-"):
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                # Size first: a range is expanded only when it fits the cap, so "0-2147483647"
                # is refused at once instead of building two billion ints.
                if hi - lo + 1 > MAX_SEEDS:
                    raise ConfigError(f"seeds: at most {MAX_SEEDS} per launch; the range "
                                      f"{part!r} holds {hi - lo + 1}")
                seeds.extend(range(lo, hi + 1))
            else:
                seeds.append(int(part))
            if len(set(seeds)) > MAX_SEEDS:
                raise ConfigError(f"seeds: at most {MAX_SEEDS} per launch, got more")
        except ConfigError:
            raise
        except ValueError:
            raise ConfigError(f"seeds: {part!r} is not a seed or a range like 0-2 "
                              "(give integers separated by commas)") from None
    seeds = list(dict.fromkeys(seeds))
    if not seeds:
        raise ConfigError("seeds: give at least one seed, e.g. 0 or 0,1,2")
    if any(s < 0 or s > 2**31 - 1 for s in seeds):
        raise ConfigError("seeds must be in [0, 2147483647]")
    if len(seeds) > MAX_SEEDS:
        raise ConfigError(f"seeds: at most {MAX_SEEDS} per launch, got {len(seeds)}")
    return seeds


# -- backbone -------------------------------------------------------------------------------
@st.cache_data(show_spinner=False, max_entries=256)
def _name_error(name: str) -> str | None:
    if not name:
        return "backbone: enter a timm model name, e.g. vit_base_patch16_224"
    try:
        check_backbone_name(name)
    except BackboneError as e:
        return f"backbone: {e}"
    return None


@st.cache_data(show_spinner="Reading the checkpoint…", max_entries=16)
def _checkpoint_error(path: str, mtime_ns: int, size: int) -> str | None:
    """Read the whole file once per version of it (keyed by mtime and size)."""
    try:
        check_checkpoint(path)
    except BackboneError as e:
        return f"checkpoint: {e}"
    return None


@st.cache_data(ttl=60, show_spinner="Checking the weights hub…")
def _hub_reachable() -> bool:
    return hub_reachable()


def check_device(device: str) -> str | None:
    """``train.device=cuda`` on a machine without a GPU fails inside the run: refuse it here."""
    if device == "cuda" and not hardware()["gpus"]:
        return ("train.device is cuda but torch sees no GPU on this machine; choose auto or "
                "cpu")
    return None


def backbone_picker(key: str = "backbone") -> Choice:
    """Embedded default, a timm ViT by name, or a local checkpoint file.

    Values: ``backbone``, ``pretrained``, ``checkpoint`` (for ``make_run_config``). What would
    fail inside the run is refused here: a name that is no timm ViT (with the nearest names),
    an unreadable checkpoint, hub weights that are not on this machine while the hub cannot
    be reached. ``notes`` says when the weights will be downloaded.
    """
    kinds = {"embedded": "Embedded default", "timm": "timm ViT by name",
             "checkpoint": "Local checkpoint"}
    kind = st.radio("Backbone", list(kinds), format_func=kinds.get, horizontal=True,
                    key=f"{key}.kind", bind=BIND)
    out = Choice()
    if kind == "embedded":
        info = embedded_info()
        a = info["arch"]
        st.caption(f"`{EMBEDDED_BACKBONE}`: {a['depth']} blocks, width {a['embed_dim']}, "
                   f"{a['patch_size']} px patches on {a['img_size']} px images; pretrained "
                   "offline by the project's own recipe (not on ImageNet).")
        if not info["weights_present"]:
            st.warning(f"The embedded weights are missing (`{info['weights']}`): runs start "
                       "from random initialisation.")
        random_init = st.checkbox(
            "Random initialisation (ignore the pretrained weights)",
            value=not info["weights_present"], disabled=not info["weights_present"],
            help="Trains from scratch: a baseline for what pretraining brings.",
            key=f"{key}.random_init", bind=BIND)
        out.values = {"backbone": EMBEDDED_BACKBONE, "pretrained": not random_init,
                      "checkpoint": None}
    elif kind == "timm":
        name = st.text_input("timm model name", value="vit_base_patch16_224",
                             help="Any timm VisionTransformer, e.g. vit_small_patch16_224.",
                             key=f"{key}.name", bind=BIND).strip()
        pretrained = st.checkbox(
            "Pretrained (needs network)", value=True,
            help="Downloads the weights through timm's hub; offline, use a local checkpoint.",
            key=f"{key}.pretrained", bind=BIND)
        out.values = {"backbone": name, "pretrained": pretrained, "checkpoint": None}
        if err := _name_error(name):
            out.errors.append(err)
        elif pretrained and not hub_weights_cached(name):
            if _hub_reachable():
                st.info(f"The pretrained weights of `{name}` are not on this machine yet: the "
                        "run downloads them first (shown as “downloading weights”).",
                        icon=":material/download:")
            else:
                out.errors.append(
                    f"backbone: the pretrained weights of {name!r} are not on this machine and "
                    "the weights hub cannot be reached (offline); choose Local checkpoint, or "
                    "untick Pretrained to train from random initialisation")
    else:
        name = st.text_input("Architecture (timm model name)", value=EMBEDDED_BACKBONE,
                             key=f"{key}.arch", bind=BIND).strip()
        path = st.text_input(
            "Checkpoint file", placeholder="/path/to/weights.safetensors",
            help="Backbone weights for that architecture: safetensors, or a torch file "
                 "(read with weights_only=True). The classifier head is never taken from it.",
            key=f"{key}.path", bind=BIND).strip()
        out.values = {"backbone": name, "pretrained": True, "checkpoint": path or None}
        if err := _name_error(name):
            out.errors.append(err)
        file = Path(path).expanduser()
        if not path:
            out.errors.append("checkpoint: enter the path of a weights file")
        elif not file.is_file():
            out.errors.append(f"checkpoint: no file at {path}")
        elif file.suffix not in CHECKPOINT_SUFFIXES:
            out.errors.append(f"checkpoint: {path} is not a weights file "
                              f"({', '.join(CHECKPOINT_SUFFIXES)})")
        elif err := _checkpoint_error(str(file.resolve()), file.stat().st_mtime_ns,
                                      file.stat().st_size):
            out.errors.append(err)
        else:
            out.values["checkpoint"] = str(file.resolve())
    for e in out.errors:
        st.error(e, icon=":material/error:")
    return out


# -- data -----------------------------------------------------------------------------------
@st.cache_data(ttl=30, max_entries=32, show_spinner="Checking the folder…")
def folder_report(path: str) -> dict[str, Any]:
    """Read a task folder as a run would (every split file, line and image path checked).

    Returns the task's description, or ``{"error": message}``; kept for 30 s.
    """
    from ..data.formats import read_task

    try:
        return read_task(path).describe()
    except (DataError, OSError, ValueError) as e:
        return {"error": str(e)}


def data_picker(key: str = "data") -> Choice:
    """An embedded task or a task folder, and the input normalisation.

    Values: ``data`` (a SPEC) and ``normalization`` (for ``make_run_config``).
    """
    kinds = {"embedded": "Embedded task", "folder": "Task folder"}
    kind = st.radio("Data", list(kinds), format_func=kinds.get, horizontal=True,
                    key=f"{key}.kind", bind=BIND)
    out = Choice()
    if kind == "embedded":
        info = embedded_info()
        tasks = {t["name"]: t for t in info["tasks"] if t.get("available", True)}
        if not tasks:
            out.errors.append(f"the embedded task suite is not available ({info['error']})")
        else:
            name = st.selectbox(
                "Task", list(tasks), key=f"{key}.task", bind=BIND,
                format_func=lambda n: f"{n} ({tasks[n]['group']}, "
                                      f"{tasks[n]['num_classes']} classes)")
            t = tasks[name]
            sizes = t.get("sizes", {})
            st.caption(f"{t.get('description', '')} · train {sizes.get('train', '?')} / "
                       f"val {sizes.get('val', '?')} / test {sizes.get('test', '?')} images · "
                       f"{t.get('source', '')}")
            out.values["data"] = EMBEDDED_PREFIX + name
    else:
        path = st.text_input(
            "Task folder", placeholder="/data/vtab-1k/dtd",
            help="A VTAB-1k task folder (train800.txt, val200.txt, train800val200.txt, "
                 "test.txt), an FGVC folder (train/val/test.json) or an ImageFolder tree "
                 "(<class>/<image>). Read only, never written.",
            key=f"{key}.path", bind=BIND).strip()
        if not path:
            out.errors.append("data: enter the path of a task folder")
        else:
            report = folder_report(str(Path(path).expanduser()))
            if "error" in report:
                out.errors.append(f"data: {report['error']}")
            else:
                sizes = report["split_sizes"]
                st.success(f"{FORMAT_LABELS.get(report['format'], report['format'])} "
                           f"**{report['name']}**: {report['num_classes']} classes · train "
                           f"{sizes['train']} / val {sizes['val']} / test {sizes['test']} "
                           "images", icon=":material/check_circle:")
                for note in report["notes"]:
                    st.caption(note)
                out.values["data"] = report["root"]
    out.values["normalization"] = st.selectbox(
        "Input normalisation", list(NORMALIZATIONS), key=f"{key}.normalization", bind=BIND,
        format_func=lambda n: f"{n}: {NORMALIZATION_HELP[n]}")
    for e in out.errors:
        st.error(e, icon=":material/error:")
    return out
