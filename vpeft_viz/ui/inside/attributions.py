"""The Attributions tab: captum's maps of one test image for each chosen run, side by side."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from ...analysis.inside import attributions as attr
from ...analysis.inside import models as mdl
from ...plots import inside as plots
from . import InsideRun, progress_bar, view_model


def attributions_view(task: str, chosen: list[InsideRun]) -> None:
    able = [r for r in chosen if r.has_weights]
    if not able:
        st.info("Attributions need a run's weights; none of the chosen runs has them.")
        return
    first = view_model(able[0])
    n_test = len(first.task.splits["test"])
    depth = len(first.model.blocks)
    c1, c2, c3 = st.columns(3)
    index = int(c1.number_input(f"Test image # (0–{n_test - 1})", 0, n_test - 1, 0,
                                key="image", bind="query-params"))
    target = c2.radio("Attribute the class", list(attr.TARGETS),
                      captions=list(attr.TARGETS.values()), key="target", bind="query-params")
    block = c3.selectbox("Layer IG at the input of block", list(range(1, depth)),
                         index=depth - 2, key="block",
                         help="Tokens entering this block; the last block's input by default")
    settings = attr.AttributionSettings(block=block, target=target)
    names = mdl.class_names(first.task)
    results, titles = {}, {}
    known = {r.run_id: attr.load_attribution(r.path, index, settings, writable=r.writable)
             for r in able}
    todo = [r for r in able if known[r.run_id] is None]
    bar, step = (progress_bar(f"Attributing image #{index} for {len(todo)} run(s)")
                 if todo else (None, None))
    for k, r in enumerate(todo):
        step(r.label, k, len(todo))
        try:
            known[r.run_id] = attr.run_attribution(r.path, index, settings,
                                                   writable=r.writable, trained=view_model(r))
        except Exception as e:  # one run that cannot be rebuilt is named, not raised
            st.error(f"Cannot attribute with run {r.run_id}: {e}", icon=":material/error:")
    if bar:
        bar.empty()
    for r in able:
        res = known[r.run_id]
        if res is None:
            continue
        results[r.label] = res
        titles[r.label] = (f"{r.label}<br>predicted {names[res['predicted']]} "
                           f"({100 * res['confidence']:.0f}%)")
    if not results:
        return
    img = mdl.test_image(first, index)
    st.markdown(f"Test image **#{index}**, true class **{names[img['label']]}**; "
                f"attributing {attr.TARGETS[target]}.")
    st.plotly_chart(plots.attribution_grid(img["shown"], results, titles), key="inside-attr")
    st.dataframe(_trust_table(results, names), hide_index=True)
    st.caption(
        "Integrated Gradients: the logit of the target class, integrated from a uniform "
        "image at the normalisation mean to this image (16 Gauss–Legendre nodes, doubled up "
        "to 64 while the delta is over 1% of the logit difference); red "
        "pixels raise it, blue ones lower it; the colours of a row share one scale across "
        "runs. Completeness: Σ attributions = logit(image) − logit(baseline) up to the "
        "convergence delta — a large delta (DyT's hard token routing is not smooth) means "
        "the map does not add up. Layer IG: the same for the network above the block, on "
        "the tokens entering it (their sum over the width; CLS and prompt shares in the "
        "table). Rollout: attention alone, no gradient. Infidelity: how badly the map's "
        "sums predict the logit change when random patches are replaced by the baseline "
        "(relative: 0 perfect, 1 no better than nothing); max-sensitivity: how much the map "
        "changes under 2% input noise. docs/inside.md explains the choices.")


def _trust_table(results: dict[str, dict], names: list[str]) -> pd.DataFrame:
    rows = []
    for lab, r in results.items():
        rows.append({
            "run": lab, "target": names[r["target"]], "p(target)": r["target_prob"],
            "logit − baseline": r["logit_diff"], "IG Σ": r["ig_sum"], "IG delta": r["ig_delta"],
            "IG nodes": r["ig_steps"],
            "IG infidelity": r.get("ig_infidelity"),
            "IG infidelity (rel.)": r.get("ig_infidelity_rel"),
            "IG max-sensitivity": r.get("ig_sensitivity"),
            "layer IG delta": r["layer_delta"], "layer IG nodes": r["layer_steps"],
            "layer: CLS share": r["layer_prefix"] / r["layer_sum"] if r["layer_sum"] else None,
            "layer: prompt share": r["layer_prompts"] / r["layer_sum"] if r["layer_sum"]
            else None,
            "layer IG infidelity (rel.)": r.get("layer_infidelity_rel"),
            "layer IG max-sensitivity": r.get("layer_sensitivity"),
            "rollout off the patches": r["rollout_other"]})
    return pd.DataFrame(rows).round(4)


