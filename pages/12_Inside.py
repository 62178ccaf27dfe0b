"""Inside: per-image predictions, attributions, and where each method changed the network.

For several runs of one task at once (any methods, any seeds): a gallery of test images with
every run's prediction, filtered (misclassified by A but not B, wrong for all, one class, a
confusion cell); captum attributions of one image side by side; per-layer CKA with the
frozen backbone, CLS features before and after tuning, linear separability per layer.
"""

import streamlit as st

from vpeft_viz.methods import method_names
from vpeft_viz.ui import inside as ui
from vpeft_viz.ui import method_views
from vpeft_viz.ui.inside.attributions import attributions_view
from vpeft_viz.ui.inside.examples import examples_view
from vpeft_viz.ui.inside.network import network_view

st.set_page_config(page_title="Inside · vpeft-viz", layout="wide")
st.title("Inside the runs: examples, attributions, what changed")
st.caption("Pick a task and a few runs — methods side by side, or seeds of one method. "
           "Everything is computed from what the runs stored (their weights, rebuilt here; "
           "never downloaded) and kept, so a second visit is instant.")

runs = ui.finished_runs()
if not runs:
    st.info("No finished runs yet, neither shipped (`cached_runs/`) nor yours. Launch one "
            "below, or from the Train page, or from a terminal:\n\n"
            "`python -m vpeft_viz train --method lora --data embedded:digits`\n\n"
            "The shipped runs are regenerated with `python -m vpeft_viz cache-runs`.",
            icon=":material/info:")
    method_views.new_run_form(tuple(method_names()), key="inside-new")
    st.stop()

ui.apply_opened_view()  # e.g. a confusion cell clicked on Compare
task, chosen = ui.pick_runs(runs)
ui.compare_link(task)
if not chosen:
    st.info("Pick at least one run.")
    st.stop()

examples, attributions, network = st.tabs(ui.TABS, key="tab", bind="query-params")
with examples:
    if examples.open:
        examples_view(task, chosen)
with attributions:
    if attributions.open:
        attributions_view(task, chosen)
with network:
    if network.open:
        network_view(task, chosen)
