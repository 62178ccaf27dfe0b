"""The Examples tab: every test image with each chosen run's prediction, filtered."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from ...analysis.inside import examples as ex
from ...analysis.inside import models as mdl
from . import InsideRun, progress_bar

PAGE_SIZE = 40
GALLERY_COLUMNS = 8


def predictions(chosen: list[InsideRun]) -> dict[str, ex.Predictions]:
    """Per-image predictions of the chosen runs: known ones read back, the others computed
    from their weights with a progress bar (runs that have neither are left out)."""
    out: dict[str, ex.Predictions] = {}
    todo = []
    for r in chosen:
        p = ex.cached_predictions(r.path, writable=r.writable)
        if p is not None:
            out[r.run_id] = p
        elif r.has_weights:
            todo.append(r)
    if todo:
        bar, step = progress_bar(f"Predicting the test images of {len(todo)} run(s)")
        for k, r in enumerate(todo):
            try:
                out[r.run_id] = ex.run_predictions(
                    r.path, writable=r.writable,
                    progress=lambda s, d, t, k=k: step(f"{s} ({k + 1}/{len(todo)})", d, t))
            except Exception as e:  # one run that cannot be rebuilt is named, not raised
                st.error(f"Cannot predict with run {r.run_id}: {e}", icon=":material/error:")
        bar.empty()
    return {r.run_id: out[r.run_id] for r in chosen if r.run_id in out}


def _class_options(names: list[str]) -> list[str]:
    """Class names as picker options (a repeated name gets its index)."""
    return [n if names.count(n) == 1 else f"{n} (#{i})" for i, n in enumerate(names)]


def examples_view(task: str, chosen: list[InsideRun]) -> None:
    preds = predictions(chosen)
    if not preds:
        st.info("None of the chosen runs has stored weights or predictions to show.")
        return
    labels = {r.run_id: r.label for r in chosen}
    first = next(iter(preds.values()))
    options = _class_options(first.class_names)
    for r in chosen:
        if r.run_id in preds and preds[r.run_id].source != "test phase":
            note = ex.agreement(preds[r.run_id], r.path)
            if note:
                st.warning(f"{r.label}: {note}.", icon=":material/warning:")
    # options are the values the URL holds (a format_func would put its labels there)
    kind = st.radio("Show", list(ex.FILTERS), captions=list(ex.FILTERS.values()),
                    horizontal=True, key="filter", bind="query-params")
    by_label = {labels[k]: k for k in preds}
    args: dict[str, Any] = {}
    if kind == "A-not-B":
        c1, c2 = st.columns(2)
        a = c1.selectbox("A (wrong)", list(by_label), key="a", bind="query-params")
        b = c2.selectbox("B (right)", list(by_label), index=min(1, len(by_label) - 1),
                         key="b", bind="query-params")
        args.update(a=by_label[a], b=by_label[b])
    if kind in ("class", "cell"):
        cols = st.columns(3)
        true = cols[0].selectbox("True class", options, key="true", bind="query-params")
        args["true"] = options.index(true)
        if kind == "cell":
            pred = cols[1].selectbox("Predicted class", options, key="pred",
                                     bind="query-params")
            args["predicted"] = options.index(pred)
            by = cols[2].selectbox("Predicted by (any: the chosen runs' cells summed)",
                                   [ex.ANY_RUN, *by_label], key="by", bind="query-params")
            args["by"] = by_label.get(by, ex.ANY_RUN)
    try:
        shown = ex.select(preds, kind, **args)
    except ValueError as e:
        st.error(str(e), icon=":material/error:")
        return
    line = f"**{len(shown)}** of {len(first.labels)} test images"
    if kind == "cell":
        pairs = ex.cell_pairs(preds, args["true"], args["predicted"], args["by"])
        line += (f": true **{first.class_names[args['true']]}**, predicted "
                 f"**{first.class_names[args['predicted']]}** — **{pairs}** (image, run) "
                 "pairs, the count of this cell in Compare's confusion matrix of these runs")
    st.markdown(line)
    table = pd.DataFrame(ex.accuracy_table(preds, labels, shown))
    st.dataframe(table.style.format({"test accuracy": "{:.1%}", "on these images": "{:.1%}",
                                     "mean confidence here": "{:.1%}"}, na_rep="–"),
                 hide_index=True)
    if not len(shown):
        return
    gallery(chosen, preds, labels, shown)


@st.cache_resource(max_entries=4, show_spinner=False)
def _task(spec: str, seed: int):
    from ...data import resolve_data

    return resolve_data(spec, seed=seed)


def gallery(chosen: list[InsideRun], preds: dict[str, ex.Predictions],
            labels: dict[str, str], shown: np.ndarray) -> None:
    """The filtered test images, a page at a time, each with every run's prediction."""
    run = next(r for r in chosen if r.run_id in preds)
    cfg = mdl.run_config(run.path)
    samples = _task(cfg["data"]["spec"], int(cfg["train"]["seed"])).splits["test"]
    pages = max(1, -(-len(shown) // PAGE_SIZE))
    if st.session_state.get("page", 1) > pages:  # another filter left fewer pages
        st.session_state["page"] = 1
    page = st.number_input(f"Page (of {pages}, {PAGE_SIZE} images each)", 1, pages, 1,
                           key="page") if pages > 1 else 1
    picked = shown[(page - 1) * PAGE_SIZE: page * PAGE_SIZE]
    for start in range(0, len(picked), GALLERY_COLUMNS):
        cols = st.columns(GALLERY_COLUMNS)
        for col, i in zip(cols, picked[start:start + GALLERY_COLUMNS]):
            with col:
                st.image(mdl.thumbnail(samples[int(i)].path), width=96)
                st.caption(_caption(ex.caption(preds, labels, int(i))))
                st.button("Attributions", key=f"attr-{int(i)}", on_click=_inspect,
                          args=(int(i),), help=f"Attributions of test image #{int(i)}")


def _caption(text: str) -> str:
    lines = text.split("\n")
    coloured = [f":green[{ln}]" if ln.startswith("✓") else f":red[{ln}]" if ln.startswith("✗")
                else ln for ln in lines]
    return "  \n".join(coloured)


def _inspect(index: int) -> None:
    st.session_state["image"] = index
    st.session_state["tab"] = "Attributions"


