"""The live queue panel: what is queued, running and recently finished, polled from disk.

Nothing here holds state: every refresh reads the run store (``status.json`` progress,
``metrics.jsonl`` curves), so a reload, a second tab or a crashed run loses nothing. The
panel is a fragment that refreshes itself every second while runs are queued or running,
and slowly otherwise (to notice runs launched from another tab or the command line).

A run is labelled with what tells it apart at a glance (method, task, backbone, epochs,
k-shot when few-shot, seed). A finished run keeps its card, its curves and a link to the
Compare page on its task; during the first epoch, before any per-epoch point exists, the
card draws the per-step training loss the run records in its progress (``loss_curve``).
Dismissing a failed run
writes an empty ``dismissed`` file into its directory: the panel no longer lists it, and the
run itself is left as it is.
"""

from __future__ import annotations

import math
from typing import Any

import streamlit as st

from ..plots.runs import curves_figure, step_loss_figure
from ..runs import queue
from ..runs.store import Run, RunStore, RunStoreError, atomic_write_bytes
from .common import link_to_page

DISMISSED = "dismissed"  # marker file in a run directory: hidden from the live panel

ACTIVE_EVERY_S = 1.0
IDLE_EVERY_S = 10.0
STATE_ICONS = {"queued": ":material/schedule:", "running": ":material/play_circle:",
               "done": ":material/check_circle:", "failed": ":material/error:",
               "cancelled": ":material/cancel:"}
PHASES = {"data": "loading data", "weights": "downloading weights",
          "prepare": "preparing the method (selection from data)",
          "source": "finding the source run (PVP's pre-trained prompts)",
          "test": "testing the selected weights"}


def live_panel(store: RunStore) -> None:
    """Queue, live progress and recent runs of ``store``; refreshes itself while busy."""
    active = queue.queue_state(store).active
    every = ACTIVE_EVERY_S if active else IDLE_EVERY_S
    st.fragment(_panel, run_every=every)(store, active)


def _panel(store: RunStore, was_active: bool) -> None:
    state = queue.queue_state(store)
    if state.queued and queue.ensure_worker(store):  # e.g. runs left queued by a restart
        state = queue.queue_state(store)
    if state.active != was_active:
        st.rerun()  # switch the refresh rate (a full rerun re-creates this fragment)

    busy = {slot: pid for slot, pid in state.workers.items() if pid}
    if busy:
        st.caption("Worker: " + ", ".join(f"{s} (pid {p})" for s, p in busy.items()))
    elif not state.active:
        st.caption("No runs queued or running.")

    for job in state.running:
        running_card(job)
    if state.queued:
        st.markdown(f"**Queue** ({len(state.queued)} waiting, next first)")
        for i, job in enumerate(state.queued, 1):
            left, right = st.columns([6, 1], vertical_alignment="center")
            left.markdown(f"{i}. {STATE_ICONS['queued']} {job.label} `{job.id}`")
            right.button("Cancel", key=f"cancel-{job.id}", on_click=queue.cancel,
                         args=(job.run,), help="Remove from the queue")
    recent = [job for job in state.recent if not (job.run.path / DISMISSED).exists()]
    if recent:
        st.markdown("**Recent runs**")
        for i, job in enumerate(recent):
            finished_row(job, newest=i == 0)
    if state.unreadable:
        with st.expander(f"{len(state.unreadable)} run(s) could not be read"):
            st.code("\n".join(f"{run_id}: {why}" for run_id, why in state.unreadable))


def run_label(config: dict[str, Any]) -> str:
    """'lora · digits · vit_tiny_patch4_32_vpeft · 10 epochs · seed 0': what tells runs apart."""
    train = config.get("train", {})
    epochs = train.get("epochs", "?")
    return " · ".join([str(config.get("method", "?")), str(config.get("data", {}).get("name", "?")),
                       str(config.get("backbone", {}).get("name", "?")),
                       f"{epochs} epoch{'' if epochs == 1 else 's'}",
                       *([f"{train['shots']}-shot"] if train.get("shots") else []),
                       f"seed {train.get('seed', '?')}"])


def dismiss(run: Run) -> None:
    """Hide a finished run from the panel (its directory is kept; see the module docstring)."""
    atomic_write_bytes(run.path / DISMISSED, b"")


def running_card(job: queue.Job) -> None:
    with st.container(border=True):
        left, right = st.columns([6, 1], vertical_alignment="center")
        left.markdown(f"{STATE_ICONS['running']} **{run_label(job.config)}** running · "
                      f"`{job.id}`")
        cancelling = job.run.cancel_requested()
        right.button("Cancel", key=f"cancel-{job.id}", on_click=queue.cancel,
                     args=(job.run,), disabled=cancelling,
                     help="Stop after the current step; finished epochs are kept")
        frac, text = progress_text(job.progress, cancelling)
        st.progress(frac, text=text)
        show_warnings(job)
        metrics = _read(job.run.metrics, [])
        if metrics:
            st.plotly_chart(curves_figure(metrics), key=f"curves-{job.id}", width="stretch")
        elif job.progress.get("loss_curve"):  # epoch 1: no per-epoch point yet
            st.plotly_chart(step_loss_figure(job.progress["loss_curve"]),
                            key=f"steps-{job.id}", width="stretch")


def show_warnings(job: queue.Job) -> None:
    """What the data check found suspicious (e.g. images shared by train and test)."""
    for warning in job.status.get("warnings") or []:
        st.warning(warning, icon=":material/warning:")


def finished_row(job: queue.Job, newest: bool = False) -> None:
    """A finished run's card: result line, its curves (open for the newest run), a link to
    the Compare page on its task; a failed run's error, traceback and a Dismiss button."""
    summary = _read(job.run.summary, None) or {}
    icon = STATE_ICONS.get(job.state, "")
    line = f"{icon} **{run_label(job.config)}** {job.state} · `{job.id}`"
    with st.container(border=True):
        if job.state == "done":
            line += (f" · val {_pct(summary.get('val_acc'))} · test "
                     f"{_pct(summary.get('test_acc'))} · {summary.get('train_time_s') or 0:.1f} s")
            st.markdown(line)
        elif job.state == "cancelled":
            epochs = summary.get("epochs_done", len(_read(job.run.metrics, [])))
            st.markdown(f"{line} after {epochs} epoch{'s' if epochs != 1 else ''}")
        else:
            left, right = st.columns([6, 1], vertical_alignment="center")
            left.markdown(line)
            right.button("Dismiss", key=f"dismiss-{job.id}", on_click=dismiss, args=(job.run,),
                         help="Hide this failed run here (its directory is kept)")
            st.error(job.error or "failed without an error message", icon=":material/error:")
            trace = job.run.path / "error.txt"
            if trace.is_file():
                with st.expander("Traceback"):
                    st.code(trace.read_text(errors="replace")[-8000:], language="text")
        metrics = _read(job.run.metrics, [])
        if metrics:
            with st.expander("Curves", expanded=newest):
                st.plotly_chart(curves_figure(metrics), key=f"curves-{job.id}",
                                width="stretch")
        task = job.config.get("data", {}).get("name", "")
        if job.state == "done":
            link_to_page("2_Compare.py", f"Compare it with the other runs on {task}",
                         icon=":material/compare_arrows:", query_params={"task": task})
        show_warnings(job)


def _read(reader, default):
    """A run file's content, or ``default`` while it is corrupt (the Compare page says so)."""
    try:
        return reader()
    except RunStoreError:
        return default


def progress_text(progress: dict[str, Any], cancelling: bool = False) -> tuple[float, str]:
    """(fraction done, one line: phase or epoch/step, loss, ETA) from ``status.json``."""
    step, steps = int(progress.get("step") or 0), int(progress.get("steps") or 0)
    frac = min(1.0, step / steps) if steps else 0.0
    phase = progress.get("phase", "")
    if cancelling:
        text = "cancelling after the current step…"
    elif phase == "prepare" and progress.get("prepare_total"):
        done, total = int(progress.get("prepare_done") or 0), int(progress["prepare_total"])
        frac = min(1.0, done / total)
        text = f"{PHASES['prepare']}: {done}/{total}"
    elif phase == "source" and progress.get("source_steps"):  # training it on first use
        done, total = int(progress.get("source_step") or 0), int(progress["source_steps"])
        frac = min(1.0, done / total)
        text = (f"training the source run {progress.get('source_run', '')} (first use only): "
                f"step {done}/{total}")
    elif phase in PHASES or not steps:
        text = PHASES.get(phase, "starting…")
    else:
        epochs = int(progress.get("epochs") or 1)
        per_epoch = max(1, steps // max(1, epochs))
        epoch = min(epochs, step // per_epoch + 1)
        text = f"epoch {epoch}/{epochs} · step {step}/{steps}"
        if progress.get("loss") is not None:
            text += f" · loss {progress['loss']:.3f}"
        if progress.get("eta_s") is not None:
            text += f" · ETA {format_seconds(progress['eta_s'])}"
        if int(progress.get("rounds") or 1) > 1:  # a method training in rounds (E²VPT)
            text = (f"round {int(progress.get('round') or 0) + 1}/{int(progress['rounds'])} "
                    f"({progress.get('round_label', '')}) · {text}")
    return frac, text


def format_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"
