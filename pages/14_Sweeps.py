"""Sweeps: progress of each sweep in the run store, settings → accuracy, best setting per method.

A sweep (``python -m vpeft_viz sweep SPEC``, locally or on a Ray cluster; docs/sweeps.md)
writes its runs into the store like any other run; this page reads them while they train.
The best setting per method is chosen on validation accuracy only, then its test accuracy is
shown.
"""

import time

import streamlit as st

from vpeft_viz.analysis import sweeps as sweeps_view
from vpeft_viz.plots import sweeps as plots
from vpeft_viz.runs import user_store_path

ACTIVE_EVERY_S = 2.0
IDLE_EVERY_S = 30.0

st.set_page_config(page_title="Sweeps · vpeft-viz", layout="wide")
st.title("Sweeps")
store = user_store_path()
st.caption(f"Sweeps in the run store `{store}` (set `VPEFT_VIZ_RUNS` to watch another, e.g. a "
           "cluster's shared store). A sweep runs methods × tasks × seeds × settings from a "
           "TOML spec, on this machine's job queue or on a Ray cluster; its runs are ordinary "
           "runs, also on the Compare page.")

sweeps, problems = sweeps_view.load_sweeps(store)
for problem in problems:
    st.warning(f"A sweep manifest could not be read: {problem}")
if not sweeps:
    st.info("No sweeps in this store yet. Start one from the repository root, e.g.\n\n"
            "`python -m vpeft_viz sweep examples/sweep.toml --backend local` "
            "(or `--backend ray`; add `--dry-run` to see the plan first). docs/sweeps.md "
            "describes the spec and running on a cluster.", icon=":material/info:")
    st.stop()

names = [s.name for s in sweeps]
name = st.selectbox("Sweep", names, key="sweep", bind="query-params")


def show(name: str, was_active: bool) -> None:
    found = {s.name: s for s in sweeps_view.load_sweeps(store)[0]}
    sweep = found.get(name)
    if sweep is None:
        st.warning(f"Sweep {name} is no longer in the store.")
        return
    if sweep.active != was_active:
        st.rerun()  # switch the refresh rate
    runs, manifest = sweep.runs, sweep.manifest
    counts = sweeps_view.progress_counts(runs)
    total = len(runs)
    st.progress(counts["done"] / total if total else 0.0,
                text=f"{counts['done']} of {total} runs done")
    c = st.columns(5)
    c[0].metric("done", counts["done"])
    c[1].metric("running", counts["running"])
    c[2].metric("queued", counts["queued"] + counts["missing"])
    c[3].metric("failed or cancelled", counts["failed"] + counts["cancelled"])
    eta = sweeps_view.eta_s(runs, manifest)
    c[4].metric("time left (estimate)", "–" if eta is None else f"{eta / 60:.0f} min",
                help="Runs left over the rate at which runs ended since this pass of the "
                     "sweep started")
    kept = int((runs["origin"] == "kept").sum())
    retried = int((runs["attempt"] > 1).sum())
    started = manifest.get("started")
    st.caption(f"Backend **{manifest.get('backend')}**"
               + (f" at `{manifest['address']}`" if manifest.get("address") else "")
               + (f" · last started {time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}"
                  if started else "")
               + f" · {kept} run(s) were already in the store (same recipe) and kept"
               + f" · {retried} retried after their worker died"
               + (" · driver finished" if manifest.get("finished") else ""))
    st.plotly_chart(plots.status_bars(sweeps_view.method_status(runs)), key="sweep-status")
    running = sweeps_view.running_table(runs)
    if len(running):
        st.dataframe(running, hide_index=True, width="stretch")
    bad = runs[runs["status"].isin(["failed", "cancelled"])]
    if len(bad):
        with st.expander(f"{len(bad)} failed or cancelled run(s)"):
            st.dataframe(bad[["run_id", "method", "task", "setting", "seed", "status",
                              "attempt", "error"]], hide_index=True, width="stretch")
    for problem in sweep.problems:
        st.warning(f"Unreadable run: {problem}")

    st.subheader("Settings → accuracy")
    done = sweeps_view.finished(runs)
    if done.empty:
        st.info("No finished runs in this sweep yet; results appear here as runs end.",
                icon=":material/hourglass_top:")
        return
    axes = sweeps_view.parallel_axes(runs)
    st.plotly_chart(plots.parallel_coordinates(runs, axes), key="sweep-parcoords")
    st.caption(f"{len(done)} finished run(s), one line each, through the grid values that "
               "vary in this sweep to its validation and test accuracy (drag along an axis to "
               "filter). “—”: the setting does not apply to that method.")

    st.subheader("Best setting per method, chosen on validation")
    best = sweeps_view.best_settings(runs)
    table = best.assign(val_acc=100 * best["val_acc"], test_acc=100 * best["test_acc"],
                        test_std=100 * best["test_std"])
    st.dataframe(table, hide_index=True, width="stretch", column_config={
        "setting": st.column_config.TextColumn("best setting"),
        "val_acc": st.column_config.NumberColumn("val acc. (%)", format="%.1f",
                                                 help="Mean over the setting's finished seeds"),
        "test_acc": st.column_config.NumberColumn("test acc. (%)", format="%.1f",
                                                  help="Read after the choice, never used for it"),
        "test_std": st.column_config.NumberColumn("test ± (pp)", format="%.1f",
                                                  help="Sample standard deviation over seeds"),
        "seeds": st.column_config.TextColumn("seeds done"),
        "settings": st.column_config.TextColumn("settings compared"),
        "complete": st.column_config.CheckboxColumn(
            "final", help="Every seed of every setting of this method has finished")})
    st.caption("Per task and method, the setting with the highest mean validation accuracy "
               "over its finished seeds (each run's own epoch is also selected on validation); "
               "test accuracies are only read afterwards. Until a method's row is final, the "
               "choice may change as runs finish.")
    st.plotly_chart(plots.selection_scatter(sweeps_view.setting_means(runs), best),
                    key="sweep-selection")
    st.caption("Every setting's mean validation against mean test accuracy; ringed: the one "
               "chosen on validation.")
    with st.expander("All finished runs"):
        st.dataframe(done.drop(columns=["order", "phase", "step", "steps", "error"]),
                     hide_index=True, width="stretch")


active = next(s for s in sweeps if s.name == name).active
st.fragment(show, run_every=ACTIVE_EVERY_S if active else IDLE_EVERY_S)(name, active)
