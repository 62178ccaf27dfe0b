"""Train: start fine-tuning runs live and watch their progress.

Pick a backbone, data and methods, launch runs onto the queue, watch them live.
"""

from __future__ import annotations

import json

import streamlit as st

from vpeft_viz.config import ConfigError
from vpeft_viz.methods import get_method_class, method_names
from vpeft_viz.runs import queue, user_store
from vpeft_viz.runs.execute import make_run_config
from vpeft_viz.train import TrainConfig
from vpeft_viz.ui.forms import (
    BIND,
    backbone_picker,
    check_config,
    check_device,
    config_form,
    data_picker,
    parse_seeds,
)
from vpeft_viz.ui.live import live_panel

st.set_page_config(page_title="Train · vpeft-viz", layout="wide")
st.title("Train")
st.caption("Runs execute in a background worker (one at a time per GPU, one on the CPU) and "
           "are saved to the run store, so reloading this page or opening another tab loses "
           "nothing. No files are uploaded here: data is read from an embedded task or a "
           "folder on this machine.")
store = user_store()

left, right = st.columns(2)
with left:
    st.subheader("Backbone")
    backbone = backbone_picker()
with right:
    st.subheader("Data")
    data = data_picker()

st.subheader("Methods")
methods = st.multiselect("PEFT methods (one run per method and seed)", method_names(),
                         default=["lora"], format_func=lambda n: get_method_class(n).title or n,
                         key="methods", bind=BIND)
method_forms = {}
for name in methods:
    cls = get_method_class(name)
    with st.expander(f"{cls.title or name} settings", expanded=len(methods) == 1):
        st.caption(cls.summary)
        method_forms[name] = config_form(cls.Config, key=f"method.{name}")

st.subheader("Training")
specs = {s.name: s for s in TrainConfig.field_specs()}
c1, c2 = st.columns(2)
epochs = c1.number_input("Epochs", value=int(specs["epochs"].default), step=1, key="train.epochs",
                         help=f"{specs['epochs'].help} Allowed: {specs['epochs'].min:g} … "
                              f"{specs['epochs'].max:g}.", bind=BIND)
seeds_text = c2.text_input("Seeds", value="0", key="train.seeds", bind=BIND,
                           help="Comma-separated seeds or a range (0,1,2 or 0-2); one run each.")
errors = [*backbone.errors, *data.errors, *(e for f in method_forms.values() for e in f.errors)]
try:
    seeds = parse_seeds(seeds_text)
except ConfigError as e:
    st.error(str(e), icon=":material/error:")
    errors.append(str(e))
    seeds = []
with st.expander("More training settings"):
    recipe = config_form(TrainConfig, key="train", exclude=("epochs", "seed"))
train = {**recipe.values, "epochs": int(epochs), "seed": seeds[0] if seeds else 0}
errors += recipe.errors
if not recipe.errors and (err := check_config(TrainConfig, train)):
    errors.append(err)
if err := check_device(train.get("device", "auto")):
    st.error(err, icon=":material/error:")
    errors.append(err)
if not methods:
    errors.append("choose at least one method")

# The exact configurations the button queues, built (and validated) before it is offered.
configs = []
if not errors:
    try:
        configs = [make_run_config(method=m, method_config=method_forms[m].values,
                                   train={**train, "seed": s}, data=data.values["data"],
                                   normalization=data.values["normalization"], **backbone.values)
                   for m in methods for s in seeds]
    except ConfigError as e:
        st.error(str(e), icon=":material/error:")
        errors.append(str(e))

n_runs = len(methods) * len(seeds)
if errors:
    st.warning(f"Launch is blocked until {'this is' if len(errors) == 1 else 'these are'} "
               "fixed: " + "; ".join(errors), icon=":material/block:")
launch = st.button(f"Launch {n_runs} run{'s' if n_runs != 1 else ''}", type="primary",
                   disabled=bool(errors), key="launch",
                   help=errors[0] if errors else "Put the runs on the queue")
if configs:
    with st.expander(f"Exactly what Launch queues ({len(configs)} run configuration"
                     f"{'s' if len(configs) != 1 else ''}, as saved in each run's config.json)"):
        st.code(json.dumps(configs if len(configs) > 1 else configs[0], indent=1),
                language="json")
if launch and configs:
    runs = [queue.submit(store, c) for c in configs]
    queue.ensure_worker(store)
    st.success(f"Queued {len(runs)} run{'s' if len(runs) != 1 else ''}.",
               icon=":material/schedule:")

st.subheader("Queue and live runs")
live_panel(store)
