"""The Network tab: per-layer CKA with the frozen backbone, CLS features in 2-D before and
after tuning, linear separability per layer."""

from __future__ import annotations

import numpy as np
import streamlit as st

from ...analysis.inside import models as mdl
from ...analysis.inside import network as net
from ...plots import inside as plots
from . import InsideRun, frozen_of, progress_bar, view_model

IMAGE_SETS = (100, 200, 500, 1000)


def network_view(task: str, chosen: list[InsideRun]) -> None:
    able = [r for r in chosen if r.has_weights]
    if not able:
        st.info("Comparing with the frozen backbone needs a run's weights; none of the "
                "chosen runs has them.")
        return
    n_test = len(view_model(able[0]).task.splits["test"])
    sets = [n for n in IMAGE_SETS if n < n_test] + [n_test]
    images = st.select_slider("Test images (the first ones of the split)", sets,
                              value=500 if 500 in sets else sets[-1], key="images",
                              bind="query-params")
    settings = net.NetworkSettings(images=int(images))
    groups: dict[str, list[InsideRun]] = {}
    for r in able:
        groups.setdefault(mdl.FrozenSpec.of(mdl.run_config(r.path)).key(), []).append(r)
    if len(groups) > 1:
        st.warning("The chosen runs start from different backbones (or random inits): each "
                   "is compared with its own frozen backbone.", icon=":material/warning:")
    nets = {r.run_id: net.load_network(r.path, settings, writable=r.writable) for r in able}
    missing = [r for r in able if nets[r.run_id] is None]
    if missing:
        st.warning(f"{len(missing)} run(s) not measured on these {images} images yet: "
                   + ", ".join(r.label for r in missing) + ". One pass over the images "
                   "through the frozen backbone and each run, then kept.",
                   icon=":material/hourglass_empty:")
        if st.button(f"Measure {len(missing)} run(s) now", key="inside-measure",
                     type="primary") and _measure(missing, settings, groups) == 0:
            st.rerun()
    done = {r.run_id: nets[r.run_id] for r in able if nets[r.run_id] is not None}
    if not done:
        return
    by_id = {r.run_id: r for r in able}
    names = mdl.class_names(view_model(able[0]).task)
    layers = next(iter(done.values()))["layers"]
    what = st.radio("CKA of", ["tokens", "CLS"], horizontal=True, key="cka-of",
                    format_func={"tokens": "every image token", "CLS": "the CLS token"}.get)
    curves = {by_id[k].label: v["cka_tokens" if what == "tokens" else "cka_cls"]
              for k, v in done.items()}
    colours = plots.run_colours([plots.FROZEN, *curves])
    st.plotly_chart(plots.cka_curves(layers, curves, colours, what=what), key="inside-cka")
    st.caption("Linear CKA between the frozen backbone's and the tuned model's "
               "representations of the same test images, layer by layer (1: the layer "
               "represents the images as before, up to a rotation and scale). Tokens: every "
               "image token is an example (prompt tokens excluded); CLS: one vector per image.")
    _embedding_view(done, layers, settings, groups, names)
    _probe_view(able, by_id, layers, settings, groups, colours, names)


def _measure(missing: list[InsideRun], settings: net.NetworkSettings,
             groups: dict[str, list[InsideRun]]) -> int:
    """Measure ``missing`` with a progress bar; returns how many groups failed (each
    failure is shown, naming its runs)."""
    bar, step = progress_bar(f"Measuring {len(missing)} run(s)")
    ids, failed = {r.run_id for r in missing}, 0
    for members in groups.values():
        todo = [r for r in members if r.run_id in ids]
        if not todo:
            continue
        try:
            _, frozen = frozen_of(todo[0])
            net.measure_runs([(r.path, r.writable) for r in todo], settings, progress=step,
                             models={r.path: view_model(r) for r in todo}, frozen=frozen)
        except Exception as e:  # reported with the runs it concerns
            failed += 1
            st.error(f"Measuring {', '.join(r.run_id for r in todo)} failed: {e}",
                     icon=":material/error:")
    bar.empty()
    return failed


@st.cache_data(max_entries=32, show_spinner="Embedding the features in 2-D…")
def _embedded(features: np.ndarray, method: str) -> np.ndarray:
    return net.embed_2d(features, method)


def _embedding_view(done, layers, settings, groups, names) -> None:
    st.markdown("**CLS features before and after tuning**")
    c1, c2 = st.columns(2)
    layer = c1.selectbox("Layer", layers, index=len(layers) - 1, key="embed-layer")
    method = c2.radio("Embedding", list(net.EMBEDDINGS), horizontal=True, key="embed",
                      format_func={"pca": "PCA", "tsne": "t-SNE"}.get)
    li = layers.index(layer)
    panels: dict[str, np.ndarray] = {}
    labels = None
    for members in groups.values():
        measured = [r for r in members if r.run_id in done]
        if not measured:
            continue
        spec = mdl.FrozenSpec.of(mdl.run_config(measured[0].path))
        frozen = net.load_frozen_network(spec, settings)
        if frozen is not None:
            name = plots.FROZEN if len(groups) == 1 else f"{plots.FROZEN} ({measured[0].label})"
            panels[name] = _embedded(np.asarray(frozen["cls"][:, li], np.float32), method)
            labels = frozen["labels"]
        for r in measured:
            panels[r.label] = _embedded(np.asarray(done[r.run_id]["cls"][:, li], np.float32),
                                        method)
            labels = done[r.run_id]["labels"] if labels is None else labels
    st.plotly_chart(plots.embeddings(panels, labels, names,
                                     method={"pca": "PCA", "tsne": "t-SNE"}[method]),
                    key="inside-embed")
    st.caption("Each panel embeds one model's CLS features of the same test images on its "
               "own (PCA: the two directions of largest variance; t-SNE: neighbourhoods, "
               "perplexity 30, distances between clusters mean little).")


def _probe_view(able, by_id, layers, settings, groups, colours, names) -> None:
    st.markdown("**Linear separability per layer**")
    probes = {r.run_id: net.load_probes(r.path, settings, writable=r.writable) for r in able}
    frozen = {}
    for members in groups.values():
        spec = mdl.FrozenSpec.of(mdl.run_config(members[0].path))
        frozen[spec.key()] = net.load_frozen_probes(spec, settings)
    missing = [r for r in able if probes[r.run_id] is None]
    if missing or any(v is None for v in frozen.values()):
        st.caption(f"A logistic regression per layer on the CLS features of the first "
                   f"{settings.probe_train} train images (C chosen on {settings.probe_val} "
                   f"validation images), tested on the {settings.images} test images: "
                   f"{len(missing)} run(s) and the frozen backbone to fit.")
        if st.button("Fit the linear probes", key="inside-probes"):
            bar, step = progress_bar("Linear probes")
            failed = 0
            for members in groups.values():
                try:
                    _, fz = frozen_of(members[0])
                    net.fit_probes([(r.path, r.writable) for r in members], settings,
                                   progress=step,
                                   models={r.path: view_model(r) for r in members}, frozen=fz)
                except Exception as e:  # reported with the runs it concerns
                    failed += 1
                    st.error(f"Fitting probes for {', '.join(r.run_id for r in members)} "
                             f"failed: {e}", icon=":material/error:")
            bar.empty()
            if not failed:
                st.rerun()
    curves = {}
    if len(groups) == 1 and next(iter(frozen.values())) is not None:
        curves[plots.FROZEN] = next(iter(frozen.values()))["test_acc"]
    curves.update({by_id[k].label: v["test_acc"] for k, v in probes.items() if v is not None})
    if curves:
        st.plotly_chart(plots.separability_curves(layers, curves, colours,
                                                  chance=1 / len(names)),
                        key="inside-probes-chart")
        st.caption("How linearly separable the classes are in each layer's CLS token: test "
                   "accuracy of a logistic regression fitted on the train images' features "
                   "(standardised), C chosen on validation. Where a tuned curve rises above "
                   "the frozen one, the method made that layer more class-specific.")
