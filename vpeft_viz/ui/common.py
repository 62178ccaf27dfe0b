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

import pandas as pd
import streamlit as st

from ..analysis.compare import PROTOCOL_NOTE
from ..runs import REPO_ROOT

PAGES_DIR = REPO_ROOT / "pages"


# -- pages --------------------------------------------------------------------------------
def page_files() -> list[Path]:
    """Every page script, ``pages/*.py`` in file-name order (new pages appear by themselves)."""
    return sorted(p for p in PAGES_DIR.glob("*.py") if not p.name.startswith("_"))


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
def comparison_table(agg: pd.DataFrame) -> None:
    """The per-task comparison (one row per task × method × setting), sortable, in %."""
    t = pd.DataFrame({
        "Task": agg["task"], "Group": agg["task_group"], "Method": agg["method"],
        "Setting": agg["setting"], "Backbone": agg["backbone"], "Seeds": agg["n_seeds"],
        "Val acc": 100 * agg["val_acc"], "Val ±": 100 * agg["val_acc_std"],
        "Test acc": 100 * agg["test_acc"], "Test ±": 100 * agg["test_acc_std"],
        "Trainable": agg["trainable_params"],
        "Excl. head": agg["trainable_params_excl_head"],
        "% of backbone": agg["pct_backbone"], "Bytes per task": agg["weight_bytes"],
        "Train time": agg["train_time_s"], "Images/s": agg["images_per_s"],
        "Peak memory": agg["peak_memory_bytes"], "FLOPs/image": agg["flops_per_image"],
        "PPT": 100 * agg["ppt"],
    })
    num = st.column_config.NumberColumn
    st.dataframe(t, hide_index=True, width="stretch", column_config={
        "Val acc": num(format="%.2f", help="Best validation accuracy (%), mean over seeds"),
        "Val ±": num(format="%.2f", help="Sample standard deviation over seeds"),
        "Test acc": num(format="%.2f", help="Test accuracy (%) at the epoch chosen on "
                        "validation, mean over seeds"),
        "Test ±": num(format="%.2f", help="Sample standard deviation over seeds"),
        "Trainable": num(format="compact", help="Trainable parameters, classifier head "
                         "included"),
        "Excl. head": num(format="compact", help="Trainable parameters of the method alone"),
        "% of backbone": num(format="%.3f%%", help="Trainable parameters without the head, "
                             "as a share of the backbone's parameters"),
        "Bytes per task": num(format="bytes", help="Size of the weights file a task must "
                              "keep (trainable tensors only)"),
        "Train time": num(format="%.1f s", help="Training wall time, mean over seeds"),
        "Images/s": num(format="%.0f", help="Training throughput, mean over seeds"),
        "Peak memory": num(format="bytes", help="Peak GPU memory on CUDA, peak resident "
                           "memory of the process on CPU"),
        "FLOPs/image": num(format="compact", help="Inference FLOPs per image"),
        "PPT": num(format="%.2f", help="V-PETL Bench's performance-parameter trade-off: "
                   "test acc × exp(−log10(P/10⁷ + 1)), P = trainable parameters"),
    })


def means_table(means: pd.DataFrame, metric_label: str = "Test acc") -> None:
    """Averages over tasks, each labelled with the kind of mean it is."""
    t = pd.DataFrame({
        "Method": means["method"], "Setting": means["setting"], "Backbone": means["backbone"],
        "Tasks": means["n_tasks"], f"{metric_label}, plain mean": 100 * means["plain_mean"],
        "plain mean is": means["plain_label"],
        f"{metric_label}, group mean": 100 * means["group_mean"],
        "group mean is": means["group_label"].replace("", "not available"),
        "Task set": means["tasks"],
    })
    num = st.column_config.NumberColumn
    st.dataframe(t, hide_index=True, width="stretch", column_config={
        f"{metric_label}, plain mean": num(format="%.2f"),
        f"{metric_label}, group mean": num(format="%.2f"),
    })
