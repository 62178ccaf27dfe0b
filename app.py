"""vpeft-viz dashboard: ``streamlit run app.py`` (or ``make run``) from the repository root.

This script is the router: ``st.navigation`` lists the home page (labelled "Home") and every
``pages/*.py`` script, in the order of their number prefixes, so a page added later appears
by itself and each page file still runs on its own
(``AppTest.from_file("pages/2_Compare.py")``). Views are shareable: the pages keep their
task, tab and tour step in the URL's query parameters.
The icon is a file shipped in the package: a Material icon as favicon would be fetched from
Google's font servers by the browser.
"""

from __future__ import annotations

import streamlit as st

from vpeft_viz.plots import human_bytes, human_count
from vpeft_viz.runs import REPO_ROOT
from vpeft_viz.ui.common import (
    APP_ICON,
    embedded_info,
    hardware,
    page_blurb,
    page_files,
    page_path,
    page_title,
)
from vpeft_viz.ui.stores import SOURCE_LABELS, run_counts, store_roots


def home() -> None:
    st.title("vpeft-viz: a lab for visual parameter-efficient fine-tuning")
    st.markdown(
        "Parameter-efficient fine-tuning (PEFT) adapts a pretrained vision transformer to a "
        "new task by training a small set of added or selected weights instead of all of "
        "them. Here you start small fine-tuning runs live, look inside the methods (what they "
        "select, where they act, what they change), and compare them on accuracy, trainable "
        "parameters, bytes per task, FLOPs, memory and speed. The lab opens on shipped cached "
        "runs and works offline on an embedded backbone and task suite.")
    tour = next((p for p in page_files() if page_title(p) == "Methods"), None)
    if tour is not None and (path := page_path(tour.name)):
        with st.container(border=True):
            st.markdown("**New here?** The guided tour walks through one comparison on the "
                        "shipped runs, step by step, in a few minutes.")
            st.page_link(path, label="Start here: the guided tour", icon=":material/flag:",
                         query_params={"tab": "Guided tour", "step": "1"})

    left, right = st.columns(2)
    with left:
        st.subheader("This machine")
        hw = hardware()
        if hw["gpus"]:
            for g in hw["gpus"]:
                st.markdown(f"**GPU:** {g['name']} ({human_bytes(g['memory_bytes'])})")
        else:
            st.markdown(f"**No GPU found:** runs train on the CPU, {hw['cpu_cores']} cores "
                        f"({hw['torch_threads']} torch threads).")
        st.caption(f"torch {hw['torch']}, {hw['cpu_cores']} CPU cores available")

        st.subheader("Runs")
        counts, roots = run_counts(), store_roots()
        for source, by_status in counts.items():
            total = sum(by_status.values())
            detail = ", ".join(f"{n} {s}" for s, n in sorted(by_status.items()))
            st.markdown(f"**{SOURCE_LABELS[source]}:** {total} run{'s' if total != 1 else ''}"
                        + (f" ({detail})" if detail else "") + f"  \n`{roots[source]}`")
        if not counts["cached"]:
            st.caption("No cached runs shipped yet: `python -m vpeft_viz cache-runs` "
                       "regenerates them (see cached_runs/README.md).")

    with right:
        info = embedded_info()
        st.subheader("Embedded backbone")
        a = info["arch"]
        st.markdown(
            f"**`{info['backbone']}`**: a ViT with {a['depth']} blocks, width {a['embed_dim']}, "
            f"{a['num_heads']} heads, {a['patch_size']} px patches on {a['img_size']} px images; "
            "pretrained offline by the project's own recipe (not ImageNet).")
        if info["weights_present"]:
            card = f" Model card: `{info['model_card']}`." if info["model_card"] else ""
            st.caption(f"Weights: `{info['weights']}`.{card}")
        else:
            st.warning(f"Its weights are missing (`{info['weights']}`); runs on it need "
                       "random init until they are generated.")
        st.subheader("Embedded task suite")
        if info["tasks"]:
            by_group: dict[str, list[str]] = {}
            for t in info["tasks"]:
                by_group.setdefault(t["group"], []).append(
                    f"{t['name']} ({human_count(t['num_classes'])} classes)")
            for group, names in by_group.items():
                st.markdown(f"**{group}:** {', '.join(names)}")
        else:
            st.caption(f"Not available here ({info['error']}).")

    st.subheader("Pages")
    for path in page_files():
        title = page_title(path)
        blurb = page_blurb(path)
        st.page_link(str(path.relative_to(REPO_ROOT)),
                     label=title + (f": {blurb}" if blurb else ""))


st.set_page_config(page_title="vpeft-viz", page_icon=APP_ICON, layout="wide")
st.navigation([st.Page(home, title="Home", icon=":material/home:", default=True),
               *(st.Page(str(p.relative_to(REPO_ROOT)), title=page_title(p))
                 for p in page_files())]).run()
