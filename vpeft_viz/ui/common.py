"""Widgets and cached facts shared by the pages: pages list, hardware, embedded suite, methods.

Everything slow (torch/timm imports, building a backbone to count parameters) sits behind
``st.cache_resource`` / ``st.cache_data`` so a page pays for it once per server process.
"""

from __future__ import annotations

import ast
import math
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pandas as pd
import streamlit as st
from streamlit.errors import StreamlitPageNotFoundError

from ..analysis.compare import PROTOCOL_NOTE
from ..analysis.cost import human_bytes, human_count
from ..runs import REPO_ROOT

PAGES_DIR = REPO_ROOT / "pages"
# The page icon, a file shipped with the package (a Material icon as favicon is fetched from
# the network by the browser).
APP_ICON = str(Path(__file__).parent / "assets" / "icon.png")


# -- pages --------------------------------------------------------------------------------
def page_files() -> list[Path]:
    """Every page script, ``pages/*.py`` ordered by its number prefix, then name (``10_X``
    comes after ``9_Y``); new pages appear by themselves."""
    def key(p: Path) -> tuple[int, str]:
        m = re.match(r"\d+", p.name)
        return (int(m.group()) if m else 10**6, p.name)
    return sorted((p for p in PAGES_DIR.glob("*.py") if not p.name.startswith("_")), key=key)


def page_blurb(path: Path) -> str | None:
    """The first line of a page's docstring, for the home page's list of pages (a page
    describes itself: nothing to register). ``"SPT: which weights…"`` → ``"which weights…"``."""
    try:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    if not doc:
        return None
    first = doc.strip().splitlines()[0].strip().rstrip(".")
    prefix = f"{page_title(path)}:"
    return first[len(prefix):].strip() if first.startswith(prefix) else first


def page_title(path: Path) -> str:
    """'2_Compare.py' → 'Compare' (what ``st.Page`` shows for the file too)."""
    return re.sub(r"^\d+[_ -]*", "", path.stem).replace("_", " ")


def page_path(file_name: str) -> str | None:
    """The path ``st.page_link`` wants for ``pages/<file_name>``, or None if not built yet."""
    return f"pages/{file_name}" if (PAGES_DIR / file_name).is_file() else None


def link_to_page(file_name: str, label: str, *, icon: str | None = None,
                 query_params: dict[str, str] | None = None) -> None:
    """A link to ``pages/<file_name>`` (nothing if that page is not built), with the view it
    should open in its query parameters. A page script run on its own, outside the app's
    navigation (``AppTest.from_file("pages/1_Train.py")``), knows no other page: there the
    link is a plain markdown link to the same URL."""
    path = page_path(file_name)
    if path is None:
        return
    try:
        st.page_link(path, label=label, icon=icon, query_params=query_params)
    except StreamlitPageNotFoundError:
        query = f"?{urlencode(query_params, doseq=True)}" if query_params else ""
        st.markdown(f"[{label}]({page_title(Path(file_name))}{query})")


def protocol_note() -> None:
    st.info(PROTOCOL_NOTE, icon=":material/rule:")


# -- numbers ------------------------------------------------------------------------------
def pct(x: float | None, std: float | None = None, digits: int = 1) -> str:
    """A fraction as a percentage, with its spread when there is one: '83.2 ± 1.4'."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{100 * x:.{digits}f}"
    return f"{100 * x:.{digits}f} ± {100 * std:.{digits}f}"


# -- machine and embedded defaults --------------------------------------------------------
@st.cache_resource(show_spinner=False)
def hardware() -> dict[str, Any]:
    """The accelerator torch sees (GPU names and memory) and the CPU cores available."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"name": props.name, "memory_bytes": props.total_memory})
    return {"gpus": gpus, "cpu_cores": cores, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__}


@st.cache_data(show_spinner=False)
def embedded_info() -> dict[str, Any]:
    """The embedded backbone (name, architecture, whether its weights are present) and the
    embedded task suite (empty ``tasks`` with an ``error`` while it is unavailable)."""
    from ..backbones import EMBEDDED_ARCH, EMBEDDED_BACKBONE, EMBEDDED_WEIGHTS, WEIGHTS_DIR

    info: dict[str, Any] = {
        "backbone": EMBEDDED_BACKBONE, "arch": dict(EMBEDDED_ARCH),
        "weights": str(EMBEDDED_WEIGHTS.relative_to(REPO_ROOT)),
        "weights_present": EMBEDDED_WEIGHTS.is_file(),
        "model_card": str((WEIGHTS_DIR / "MODEL_CARD.md").relative_to(REPO_ROOT))
        if (WEIGHTS_DIR / "MODEL_CARD.md").is_file() else None,
        "tasks": [], "error": None,
    }
    try:
        from ..data.embedded import list_tasks

        info["tasks"] = list_tasks()
    except Exception as e:  # the suite is optional for the dashboard to open
        info["error"] = f"{type(e).__name__}: {e}"
    return info


# -- methods ------------------------------------------------------------------------------
@st.cache_data(show_spinner=False)
def method_catalogue(num_classes: int = 10) -> list[dict[str, Any]]:
    """Every registered method with its flags and its parameter count on the embedded
    backbone (random init: counting needs no weights). Methods that choose their parameters
    from data (``needs_data``) get no count here: it depends on the task."""
    from ..backbones import create_backbone
    from ..methods import attach_method, count_parameters, get_method_class, method_names

    rows = []
    backbone_params = None
    for name in method_names():
        cls = get_method_class(name)
        row = {"name": name, "title": cls.title or name, "summary": cls.summary,
               "paper": cls.paper, "mergeable": cls.mergeable,
               "identity_at_init": cls.identity_at_init, "needs_data": cls.needs_data,
               "trainable": None, "trainable_excl_head": None, "error": None}
        if not cls.needs_data:
            try:
                model = create_backbone(num_classes=num_classes, pretrained=False)
                if backbone_params is None:
                    backbone_params = sum(p.numel() for n, p in model.named_parameters()
                                          if not n.startswith("head."))
                method = cls()
                attach_method(model, method)
                counts = count_parameters(model, method)
                row.update(trainable=counts["trainable"],
                           trainable_excl_head=counts["trainable_excl_head"])
            except Exception as e:  # one broken method must not hide the others
                row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
    for row in rows:
        row["backbone_params"] = backbone_params
    return rows


# -- comparison tables --------------------------------------------------------------------
def _share(v: float) -> str:
    return f"{v:.1f} %" if v >= 1 else f"{v:.2g} %"


# Display formats of the comparison table's columns (None → shown as is); missing: "–".
_TABLE_FORMATS: dict[str, Any] = {
    "Test acc": "{:.1f}", "Test ±": "{:.1f}", "Val acc": "{:.1f}", "Val ±": "{:.1f}",
    "Trainable": human_count, "Excl. head": human_count, "% of backbone": _share,
    "Bytes per task": human_bytes, "Train time": "{:.1f} s", "Images/s": "{:.0f}",
    "Peak memory": human_bytes, "FLOPs/image": human_count, "PPT": "{:.1f}",
}
TABLE_HELP = {
    "Test acc": "Test accuracy (%) at the epoch chosen on validation, mean over seeds",
    "Test ±": "Sample standard deviation over seeds", "Val ±": "Sample standard deviation "
    "over seeds", "Val acc": "Best validation accuracy (%), mean over seeds",
    "Trainable": "Trainable parameters, classifier head included",
    "Shots": "Training images per class (few-shot split of the training split, "
             "train.shots); all: the whole training split",
    "Excl. head": "Trainable parameters of the method alone",
    "% of backbone": "Trainable parameters without the head, as a share of the backbone's",
    "Bytes per task": "Size of the weights file a task must keep (trainable tensors only)",
    "Train time": "Training wall time, mean over seeds",
    "Images/s": "Training throughput, mean over seeds",
    "Peak memory": "The run's own peak: CUDA allocator peak on GPU, peak resident memory of "
                   "the run's process during the run on CPU",
    "FLOPs/image": "Inference FLOPs per image",
    "PPT": "V-PETL Bench's performance-parameter trade-off: test acc × exp(−log10(P/10⁷ + "
           "1)), P = trainable parameters",
}


def comparison_frame(agg: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """The per-task comparison as shown: Method, setting and accuracy first, then the rest;
    columns equal on every row are taken out and returned as ``{column: value}`` (said once
    above the table instead of repeated on each row)."""
    t = pd.DataFrame({
        "Method": agg["method"], "Setting": agg["setting"],
        "Test acc": 100 * agg["test_acc"], "Test ±": 100 * agg["test_acc_std"],
        "Val acc": 100 * agg["val_acc"], "Val ±": 100 * agg["val_acc_std"],
        "Task": agg["task"], "Group": agg["task_group"], "Backbone": agg["backbone"],
        "Seeds": agg["n_seeds"],
        "Trainable": agg["trainable_params"], "Excl. head": agg["trainable_params_excl_head"],
        "% of backbone": agg["pct_backbone"], "Bytes per task": agg["weight_bytes"],
        "Train time": agg["train_time_s"], "Images/s": agg["images_per_s"],
        "Peak memory": agg["peak_memory_bytes"], "FLOPs/image": agg["flops_per_image"],
        "PPT": 100 * agg["ppt"],
    }).reset_index(drop=True)
    t["Setting"] = t["Setting"].map(lambda v: v if isinstance(v, str) and v else None)
    if "shots" in agg and agg["shots"].notna().any():  # few-shot runs among them
        t.insert(2, "Shots", [f"{int(v)} per class" if pd.notna(v) else "all"
                              for v in agg["shots"]])
    constant: dict[str, str] = {}
    if len(t) > 1:
        for col in list(t.columns):
            if col in ("Method", "Test acc") or t[col].astype(str).nunique(dropna=False) > 1:
                continue
            value = t[col].iloc[0]
            if not pd.isna(value):
                constant[col] = _display(col, value)
            t = t.drop(columns=col)
    return t, constant


def _display(col: str, value: Any) -> str:
    fmt = _TABLE_FORMATS.get(col)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if fmt is None:
        return str(value)
    return fmt(value) if callable(fmt) else fmt.format(value)


def _dashes(t: pd.DataFrame) -> pd.DataFrame:
    """Columns with a missing value become text with "–" there (the table widget shows
    "None" for a missing number, whatever the style says); full columns stay numbers, so
    they still sort as numbers."""
    t = t.copy()
    for col in t.columns:
        if t[col].isna().any():
            t[col] = [_display(col, v) for v in t[col]]
    return t


def comparison_table(agg: pd.DataFrame) -> None:
    """The per-task comparison (one row per task × method × setting), sortable; numbers
    rounded for a projector (accuracies one decimal, bytes in KB/MB/GB), "–" where a value
    is missing, and the columns that are equal on every row said once above the table."""
    t, constant = comparison_frame(agg)
    if constant:
        st.caption("Same for every row: " + " · ".join(f"**{k}** {v}"
                                                      for k, v in constant.items()))
    t = _dashes(t)
    formats = {c: (lambda v, c=c: _display(c, v)) for c in t.columns if t[c].dtype.kind in "fi"}
    st.dataframe(t.style.format(formats), hide_index=True, width="stretch",
                 column_config={c: st.column_config.Column(help=h)
                                for c, h in TABLE_HELP.items() if c in t.columns})


def means_table(means: pd.DataFrame, metric_label: str = "Test acc") -> None:
    """Averages over tasks, each labelled with the kind of mean it is."""
    t = pd.DataFrame({
        "Method": means["method"], "Setting": means["setting"],
        f"{metric_label}, plain mean": 100 * means["plain_mean"],
        f"{metric_label}, group mean": 100 * means["group_mean"],
        "Tasks": means["n_tasks"], "plain mean is": means["plain_label"],
        "group mean is": means["group_label"].replace("", "not available"),
        "Backbone": means["backbone"], "Task set": means["tasks"],
    })
    t["Setting"] = t["Setting"].map(lambda v: v if isinstance(v, str) and v else None)
    if t["Setting"].isna().all():
        t = t.drop(columns="Setting")
    pct = {f"{metric_label}, plain mean": "{:.1f}", f"{metric_label}, group mean": "{:.1f}"}
    t = t.copy()
    for col in t.columns:
        if t[col].isna().any():
            fmt = pct.get(col)
            t[col] = ["–" if pd.isna(v) else (fmt.format(v) if fmt else str(v)) for v in t[col]]
    st.dataframe(t.style.format({c: f for c, f in pct.items() if t[c].dtype.kind == "f"}),
                 hide_index=True, width="stretch")
