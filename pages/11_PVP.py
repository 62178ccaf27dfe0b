"""PVP: accuracy against shots with pre-trained vs random prompts, and how far prompts move.

Few-shot accuracy (k = 1…16 images per class) of VPT-deep started from prompts pre-trained on
other tasks against the same prompts randomly initialised, mean ± std over seeds; the cosine
similarity of the tuned prompts with their starting values, per layer; each run's source.
"""

from pathlib import Path

import streamlit as st

from vpeft_viz.analysis import pvp as pvp_view
from vpeft_viz.analysis.compare import setting_labels
from vpeft_viz.data.fewshot import PAPER_SHOTS
from vpeft_viz.methods import methods_with_view
from vpeft_viz.methods.pvp import FEW_SHOT_EPOCHS
from vpeft_viz.plots import pvp as plots
from vpeft_viz.ui import method_views
from vpeft_viz.ui.stores import load_run_table

METHODS = methods_with_view(Path(__file__).name)  # from each method's view_page

st.set_page_config(page_title="PVP · vpeft-viz", layout="wide")
st.title("PVP: pre-trained prompts for few-shot tuning")
st.caption("VPT-deep prompts are first trained on a source task with the backbone frozen, "
           "then tuned on the task at hand from there, with a new head. In the lab the "
           "source is, by default, every other embedded task pooled into one (the task "
           "itself never in it), trained once on first use; any finished VPT-deep run can "
           "serve instead. The control is the same method with `init=random`: VPT-deep's "
           "own initialisation, on the same few-shot splits (a seed draws its split).")

runs = method_views.method_runs(METHODS)
if not runs:  # says how to get runs, offers to start one, and stops
    method_views.pick_run_or_stop(METHODS, what="PVP", key="pvp")

table = load_run_table().runs
tasks = list(dict.fromkeys(r.task for r in runs))
c1, c2 = st.columns(2)
task = c1.selectbox("Task", tasks, key="pvp-task")
acc = c2.radio("Accuracy", ["test_acc", "val_acc"], horizontal=True, key="pvp-acc",
               format_func=lambda a: {"test_acc": "test", "val_acc": "validation"}[a])
on_task = [r for r in runs if r.task == task]
backbone = on_task[0].backbone
curves = pvp_view.shot_curves(table, task=task, backbone=backbone)
variants = list(dict.fromkeys(curves["variant"]))
if len(variants) > 1:
    labels = setting_labels(variants)
    variant = st.selectbox("Settings", variants, key="pvp-variant",
                           format_func=lambda v: labels.get(v) or "defaults")
else:
    variant = variants[0] if variants else None
shown = curves[curves["variant"] == variant] if variant is not None else curves
schedules = sorted({int(e) for e in shown.loc[shown["shots"].notna(), "epochs"]})
epochs = (st.selectbox("Few-shot epochs", schedules, key="pvp-epochs") if len(schedules) > 1
          else schedules[0] if schedules else None)
shown = shown[shown["shots"].isna() | (shown["epochs"] == epochs)]
classes = table.loc[table["run_id"].isin(r.id for r in on_task), "num_classes"].dropna()
chance = 1 / classes.iloc[0] if len(classes) and classes.nunique() == 1 else None

st.subheader(f"Accuracy against shots on {task}")
reference = pvp_view.vpt_deep_reference(table, task=task, backbone=backbone, variant=variant)
st.plotly_chart(plots.shots_figure(shown, acc=acc, chance=chance, vpt_deep=reference),
                key="pvp-shots")
few = shown[shown["shots"].notna()]
if few.empty:
    st.info(f"No few-shot PVP runs on {task} yet: add points below, or from a terminal, e.g. "
            f"`python -m vpeft_viz train --method pvp --data embedded:{task} "
            f"--train-set shots=4 --epochs {FEW_SHOT_EPOCHS}` (and `--set init=random` for "
            "the control).",
            icon=":material/info:")
elif set(few["init"]) != set(pvp_view.INITS):
    missing = sorted(set(pvp_view.INITS) - set(few["init"]))
    st.info(f"Only {', '.join(sorted(set(few['init'])))} prompts on {task} so far: train "
            f"`init={missing[0]}` runs on the same shots and seeds to compare.",
            icon=":material/info:")
st.caption("Each point: mean over seeds, bar ±1 sample std; each seed trains on its own "
           "draw of k images per class from train800 (validation and test unchanged), and "
           "both inits of a seed see the same images. The paper reports gains over earlier "
           "prompt tuning such as VPT of +16.1 / +11.5 / +6.4 / +2.9 / +2.0 points at "
           "1 / 2 / 4 / 8 / 16 shots on five FGVC tasks, with an ImageNet-scale backbone and "
           "source; here the backbone, source and tasks are the lab's small embedded ones.")

gain = pvp_view.paired_gain(table, task=task, backbone=backbone, variant=variant,
                            epochs=epochs)
if len(gain):
    st.markdown("**Pre-trained minus random** (same seed, same split; test accuracy)")
    st.plotly_chart(plots.gain_figure(gain), key="pvp-gain")
overview = pvp_view.gain_overview(table, tasks, backbone=backbone, variant=variant,
                                  epochs=epochs)
if len(overview) > 1:
    st.markdown("**Gain on every task** (points of test accuracy, pre-trained − random, "
                "mean over paired seeds)")
    st.dataframe(overview.style.format("{:+.1f}", na_rep="–"), width="stretch")

st.subheader("How far the prompts move")
order = sorted(on_task, key=lambda r: (pvp_view.run_facts(r.config)["shots"] or 10**6,
                                       pvp_view.run_facts(r.config)["init"], r.seed))
run = method_views.run_picker(order, label="Run", key="pvp-run")
st.caption(pvp_view.run_label(run.config, run.id))
rec = method_views.read_record(run, pvp_view.PromptRecord.from_artifacts, "PVP prompt")
if rec is None:
    st.stop()
state = method_views.method_state(run) or {}
source = state.get("source")
summary = method_views.run_summary(run)
c = st.columns(4)
c[0].metric("test accuracy", f"{summary['test_acc']:.1%}" if summary.get("test_acc")
            is not None else "–")
c[1].metric("training images", f"{summary.get('train_size', '–')}")
c[2].metric("mean cosine, tuned vs initial", f"{rec.cosine.mean():.3f}")
c[3].metric("prompts started from", "source run" if rec.from_source else "random init")
if source:
    st.markdown(f"**Source**: run `{source.get('run_id')}` ({source.get('store')}): "
                f"{source.get('method')} on `{source.get('data')}`, "
                f"{source.get('epochs')} epochs, seed {source.get('seed')}; its test accuracy "
                f"{source.get('test_acc', float('nan')):.1%} on its own task"
                + (" · trained by this run (first use)" if source.get("trained_now") else ""))
    st.caption(f"Weights SHA-256 `{source.get('weights_sha256', '?')[:16]}…`; the initial "
               "prompts below are that run's prompts, layer by layer.")
st.plotly_chart(plots.layer_similarity_figure(pvp_view.layer_similarity(rec)),
                key="pvp-layers")
st.plotly_chart(plots.cosine_heatmap(rec.cosine), key="pvp-heatmap")
st.caption("Cosine similarity of each tuned prompt with the value training started from "
           "(1: unchanged in direction). With few images and steps, prompts stay close to "
           "their start, which is why where they start matters.")

setting_keys = dict(zip(table["run_id"], table["setting_key"]))
records = []
for other in on_task:
    if variant is not None and pvp_view.variant_of(setting_keys.get(other.id, "")) != variant:
        continue
    f = pvp_view.run_facts(other.config)
    if f["shots"] and f["epochs"] != epochs:
        continue
    other_rec = rec if other.path == run.path else method_views.read_record(
        other, pvp_view.PromptRecord.from_artifacts, "PVP prompt")
    if other_rec is not None:
        records.append((f["init"], float("nan") if f["shots"] is None else float(f["shots"]),
                        other_rec))
by_shots = pvp_view.similarity_by_shots(records)
if by_shots["shots"].nunique(dropna=False) > 1:
    st.markdown(f"**Every run on {task}**: mean cosine per layer, by init and k")
    st.plotly_chart(plots.similarity_by_shots_figure(by_shots), key="pvp-by-shots")

with st.expander("Add a point: queue a PVP run on this task"):
    a, b, c_, d = st.columns(4)
    init = a.selectbox("init", pvp_view.INITS, key="pvp-new-init")
    shots = b.selectbox("shots per class", PAPER_SHOTS, index=2, key="pvp-new-shots")
    seed = c_.number_input("seed", value=0, min_value=0, step=1, key="pvp-new-seed")
    new_epochs = d.number_input("epochs", value=epochs or FEW_SHOT_EPOCHS, min_value=1,
                                step=1, key="pvp-new-epochs")
    method_views.launch_button(
        f"Train pvp ({init}, {shots}-shot, seed {int(seed)}) on {task}", key="pvp-launch",
        method="pvp", data=run.config["data"]["spec"], method_config={"init": init},
        train={"shots": int(shots), "seed": int(seed), "epochs": int(new_epochs)},
        backbone=method_views.recorded(run.config),
        help="The first pre-trained run on a task also trains its pooled source (a few "
             "minutes on CPU), unless one is already stored.")
    with st.container():
        method_views.queue_panel()
