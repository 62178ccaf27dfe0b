"""A sweep in a store without training: the real spec, plan, manifest and run directories,
with statuses and summaries written directly (for the analysis and page tests)."""

from __future__ import annotations

import os
import time

from vpeft_viz.runs import RunStore
from vpeft_viz.runs.sweep import parse_spec, plan_sweep
from vpeft_viz.runs.sweep.manifest import write_manifest
from vpeft_viz.runs.sweep.plan import create_run

SPEC = {"name": "grid", "tasks": ["digits"], "methods": ["linear", "lora"], "seeds": [0, 1],
        "train": {"epochs": 1}, "set": {"lora": {"rank": [4, 8]}}}

# (method, rank, seed) → (status, val, test). LoRA rank 4 wins on validation although rank 8
# has the better test accuracy: the best setting must be rank 4.
OUTCOMES = {
    ("linear", None, 0): ("done", 0.40, 0.38),
    ("linear", None, 1): ("running", None, None),
    ("lora", 4, 0): ("done", 0.60, 0.50),
    ("lora", 4, 1): ("done", 0.62, 0.52),
    ("lora", 8, 0): ("done", 0.55, 0.70),
    ("lora", 8, 1): ("failed", None, None),
}


def write_fake_sweep(root, outcomes=None) -> RunStore:
    store = RunStore(root)
    spec = parse_spec(dict(SPEC), source="test-spec.toml")
    plan = plan_sweep(spec, store)
    write_manifest(root, name=spec.name, spec_file=spec.source, spec=spec.raw,
                   backend="ray", address="auto", ray=None, runs=[i.entry() for i in plan.items])
    for item in plan.items:
        run = create_run(store, item)
        key = (item.run.method, item.run.method_settings.get("rank"), item.run.seed)
        state, val, test = (outcomes or OUTCOMES)[key]
        if state == "running":  # owned by this (live) process, mid-training
            run.set_status("running", started=time.time(), pid=os.getpid(), pid_start=None,
                           host=None)
            run.update_progress(phase="train", step=5, steps=13, epochs=1)
        elif state == "failed":
            run.set_status("failed", error="RuntimeError: boom", finished=time.time())
        elif state == "done":
            run.write_summary({"run_id": run.id, "val_acc": val, "test_acc": test,
                               "train_time_s": 1.0})
            run.set_status("done", started=time.time() - 1, finished=time.time())
    return store
