"""Methods: every method in plain words, its cost, its views, and a guided tour.

The method inspector hub lists every registered method (its view page comes from the
registry) and walks through one comparison on the cached runs.
"""

import streamlit as st

from vpeft_viz.analysis.compare import aggregate
from vpeft_viz.analysis.tour import TOUR_METHODS, pick_tour_task, tour_step_index, tour_steps
from vpeft_viz.methods import view_pages
from vpeft_viz.plots.compare import pareto_scatter
from vpeft_viz.ui.common import link_to_page, method_catalogue, page_path, protocol_note
from vpeft_viz.ui.stores import load_run_table

st.set_page_config(page_title="Methods · vpeft-viz", layout="wide")
st.title("Methods")
catalogue = method_catalogue()
by_name = {m["name"]: m for m in catalogue}
views = view_pages()
# The tab and the tour step live in the URL (?tab=Guided+tour&step=3): a lecturer can share it.
hub, tour = st.tabs(["All methods", "Guided tour"], key="tab", bind="query-params")

with hub:
    st.caption(f"{len(catalogue)} registered methods. Parameter counts are on the embedded "
               "backbone with a 10-class head, head excluded; methods that choose their "
               "parameters from data are counted per task, when they run.")
    for m in catalogue:
        with st.container(border=True):
            left, right = st.columns([3, 1])
            left.markdown(f"#### {m['title']} `{m['name']}`\n{m['summary']}")
            if m["trainable_excl_head"] is not None:
                share = 100 * m["trainable_excl_head"] / m["backbone_params"]
                right.metric("trainable (no head)", f"{m['trainable_excl_head']:,}",
                             f"{share:.2f} % of backbone", delta_color="off",
                             delta_arrow="off")
            elif m["error"]:
                right.caption(f"count failed: {m['error']}")
            else:
                right.caption("trainable weights are chosen from data: counted per run")
            flags = [("mergeable" if m["mergeable"] else "not mergeable"),
                     ("identity at init" if m["identity_at_init"] else "changes outputs at "
                      "init"), *(["selects from data"] if m["needs_data"] else [])]
            left.caption(" · ".join(flags))
            links = st.columns([1, 1, 2])
            if m["paper"]:
                links[0].link_button("Paper", m["paper"])
            view = views.get(m["name"])
            if view and page_path(view):
                links[1].page_link(page_path(view), label="Open its view",
                                   icon=":material/visibility:")
            elif view:
                links[1].caption("Its view is not built yet.")
            else:
                links[1].caption("No dedicated view yet; compare it on the Compare page.")

with tour:
    st.markdown("A walk through one comparison on the shipped cached runs: "
                + ", ".join(by_name[m]["title"] for m in TOUR_METHODS if m in by_name)
                + " on one task.")
    table = load_run_table(("cached",))
    agg = aggregate(table.runs)
    task = pick_tour_task(agg)
    if task is None:
        st.info("The tour needs cached runs of " + ", ".join(TOUR_METHODS) + " on one task; "
                "there are none yet. Regenerate them with `python -m vpeft_viz cache-runs` "
                "(see cached_runs/README.md).")
    else:
        steps = tour_steps(agg, table.runs, task,
                           titles={k: v["title"] for k, v in by_name.items()},
                           summaries={k: v["summary"] for k, v in by_name.items()})
        i = tour_step_index(st.query_params.get("step"), len(steps))
        step = steps[i]
        st.progress((i + 1) / len(steps), text=f"Step {i + 1} of {len(steps)}: {step.title}")
        st.subheader(step.title)
        st.markdown(step.text)
        if step.table is not None:
            st.dataframe(step.table)
        if step.figure == "pareto":
            st.plotly_chart(pareto_scatter(agg[agg["task"] == task].reset_index(drop=True),
                                           cost="trainable_params",
                                           cost_label="trainable parameters", log_x=True),
                            key="tour-pareto")
        if i == 0:
            protocol_note()
        back, nxt, _ = st.columns([1, 1, 4])
        if back.button("Back", disabled=i == 0, key="tour-back"):
            st.query_params["step"] = str(i)  # 1-based in the URL
            st.rerun()
        if nxt.button("Next", disabled=i == len(steps) - 1, key="tour-next"):
            st.query_params["step"] = str(i + 2)
            st.rerun()
        if i == len(steps) - 1:
            link_to_page("2_Compare.py", f"Open the Compare page on {task}",
                         icon=":material/compare_arrows:", query_params={"task": task})
