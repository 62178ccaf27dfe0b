"""Command line: ``python -m vpeft_viz <command>`` (contract: docs/cli.md).

Every command without ``--backbone`` uses the embedded default. Errors exit non-zero with
one clear line on stderr; ``--json`` output is one JSON object (or list) on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .runs import user_store_path

DEFAULT_STORE = user_store_path()


def _print_json(obj: Any) -> None:
    """One line of strict JSON: NaN and infinities are printed as null (JSON has neither)."""
    from .runs.store import finite_json

    print(json.dumps(finite_json(obj), default=str, allow_nan=False))


def _shipped_store(path: Path) -> bool:
    """Whether ``path`` is (or is inside) the shipped, read-only ``cached_runs/`` store."""
    from . import runs

    target, shipped = path.expanduser().resolve(), runs.CACHED_STORE.resolve()
    return target == shipped or shipped in target.parents


def cmd_methods(args: argparse.Namespace) -> int:
    from .methods import get_method_class, method_names

    rows = []
    for name in method_names():
        cls = get_method_class(name)
        rows.append({"name": name, "title": cls.title, "summary": cls.summary,
                     "mergeable": cls.mergeable, "identity_at_init": cls.identity_at_init,
                     "needs_data": cls.needs_data, "paper": cls.paper,
                     "config": cls.Config().to_dict()})
    if args.json:
        _print_json(rows)
    else:
        width = max(len(r["name"]) for r in rows)
        for r in rows:
            print(f"{r['name']:<{width}}  {r['summary']}")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from .data.embedded import list_tasks

    rows = list_tasks()
    if args.json:
        _print_json(rows)
    else:
        for r in rows:
            sizes = "/".join(str(r["sizes"][k]) for k in ("train", "val", "test"))
            print(f"{r['name']:<14} {r['group']:<12} {r['num_classes']:>3} classes  "
                  f"{sizes:<12} {r['description']}  [{r['source']}; {r['licence']}]")
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from .backbones import create_backbone
    from .config import parse_overrides
    from .methods import attach_method, count_parameters, get_method_class

    cls = get_method_class(args.method)
    method = cls(cls.Config.from_strings(parse_overrides(args.set)))
    model = create_backbone(args.backbone, num_classes=args.num_classes, pretrained=False)
    if method.needs_data:
        state = method.counting_state(model)
        if state is None:
            raise ValueError(f"{args.method} chooses how many weights it trains from data; "
                             "its count is reported by `train`")
        method.load_state(state)
    attach_method(model, method)
    counts = count_parameters(model, method)
    stored = method.stored_bytes(model)
    if stored is not None:  # packed weights (low-bit adapters): bytes as stored, head excluded
        counts["stored_bytes"] = stored
    if args.json:
        _print_json(counts)
    else:
        for k, v in counts.items():
            print(f"{k:<20} {v:,}")
    return 0


class _ProgressBar:
    """tqdm bar on stderr driven by the engine's callbacks."""

    def __init__(self) -> None:
        self.bar = None
        self.rounds = 0  # a method may train in several rounds (E²VPT): one bar each

    def on_start(self, info: dict) -> None:
        from tqdm import tqdm

        self.close()
        label = info.get("label")  # a source run trained first (PVP's pre-trained prompts)
        self.rounds += 0 if label else 1
        self.bar = tqdm(total=info["steps"], unit="step", file=sys.stderr, dynamic_ncols=True,
                        desc=label or ("train" if self.rounds == 1 else f"round {self.rounds}"))

    def on_step(self, step: int, total: int, loss: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    def on_epoch(self, row: dict) -> None:
        self.bar.set_description(f"epoch {row['epoch']} val {row['val_acc']:.3f}")

    def should_stop(self) -> bool:
        return False

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_train(args: argparse.Namespace) -> int:
    from .config import parse_overrides
    from .runs.execute import execute_run, make_run_config
    from .runs.store import RunStore

    train = parse_overrides(args.train_set)
    from .train import TrainConfig

    train_values = TrainConfig.from_strings(train).to_dict()
    if args.epochs is not None:
        train_values["epochs"] = args.epochs
    if args.seed is not None:
        train_values["seed"] = args.seed
    from .methods import get_method_class

    method_cls = get_method_class(args.method)
    method_cfg = method_cls.Config.from_strings(parse_overrides(args.set)).to_dict()
    config = make_run_config(method=args.method, data=args.data, backbone=args.backbone,
                             method_config=method_cfg, train=train_values,
                             checkpoint=args.checkpoint, pretrained=not args.random_init,
                             normalization=args.normalization)
    if _shipped_store(args.store):
        raise ValueError(f"--store {args.store} is the shipped cached_runs/ store, which is "
                         "read-only; regenerate it with `cache-runs`, or pick another --store")
    from .runs.queue import try_claim

    store = RunStore(args.store)
    run = store.create(config, run_id=args.run_id)
    try_claim(run, "cli")  # records this process as the owner until the run starts
    print(f"run {run.id} in {store.root}", file=sys.stderr)
    bar = _ProgressBar()
    try:
        summary = execute_run(run, callbacks=[bar])
    finally:
        bar.close()
    status = run.status()
    if args.json:
        _print_json(summary)
    elif summary.get("cancelled"):
        print(f"{run.id}: cancelled after {summary.get('epochs_done', 0)} epoch(s)"
              f" ({status.get('error') or 'cancel requested'})")
    else:
        test = summary.get("test_acc", float("nan"))
        print(f"{run.id}: val {summary['val_acc']:.4f}  test {test:.4f}"
              f"  trainable {summary['trainable_params']:,}  {summary['train_time_s']:.1f}s")
    if summary.get("cancelled") and "SIGTERM" in (status.get("error") or ""):
        return 128 + 15  # the conventional exit status of a process ended by SIGTERM
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from .runs.store import RunStore

    if not args.store.is_dir():
        raise FileNotFoundError(f"no run store at {args.store} (not a directory)")
    # Writable when it may be, so that runs whose process died are recorded as failed.
    read_only = _shipped_store(args.store) or not os.access(args.store, os.W_OK)
    store = RunStore(args.store, read_only=read_only)
    rows = []
    for run in store.list():
        problem = run.problem()
        if problem is not None:  # listed, with the reason; the other runs still show
            rows.append({"run_id": run.id, "status": "unreadable", "error": problem,
                         "method": None, "task": None, "backbone": None, "seed": None,
                         "val_acc": None, "test_acc": None, "trainable_params": None})
            continue
        st, summ, cfg = run.status(), run.summary() or {}, run.config
        rows.append({"run_id": run.id, "status": st.get("status"), "error": st.get("error"),
                     "method": cfg.get("method"), "task": cfg.get("data", {}).get("name"),
                     "backbone": cfg.get("backbone", {}).get("name"),
                     "seed": cfg.get("train", {}).get("seed"),
                     "val_acc": summ.get("val_acc"), "test_acc": summ.get("test_acc"),
                     "trainable_params": summ.get("trainable_params")})
    if args.json:
        _print_json(rows)
    else:
        for r in rows:
            if r["status"] == "unreadable":
                print(f"{r['run_id']}  unreadable: {r['error']}")
                continue
            acc = "" if r["test_acc"] is None else f"test {r['test_acc']:.4f}"
            print(f"{r['run_id']}  {r['status']:<9} {str(r['method']):<12} "
                  f"{str(r['task']):<12} {acc}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .runs.store import RunStore
    from .runs.sweep import run_sweep

    if _shipped_store(args.store):
        raise ValueError(f"--store {args.store} is the shipped cached_runs/ store, which is "
                         "read-only; pick another --store")
    if args.address is not None and args.backend != "ray":
        raise ValueError("--address is for --backend ray")
    seen = {"planned": 0, "ended": 0}

    def progress(event: dict) -> None:
        if event["kind"] == "plan":
            plan = event["plan"]
            todo = plan.count("new") + plan.count("restarted")
            seen.update(planned=len(plan.items), ended=plan.count("kept"))
            print(f"sweep {plan.spec.name}: {len(plan.items)} runs planned, "
                  f"{plan.count('kept')} already done, {plan.count('in progress')} in "
                  f"progress, {todo} to run ({args.backend}) in {args.store}", file=sys.stderr)
            if args.dry_run:
                for item in plan.items:
                    print(f"  {item.origin:<11} {item.run_id}  {item.run.label}",
                          file=sys.stderr)
        elif event["kind"] == "retry":
            print(f"[retry {event['retry']}] {event['label']}: {event.get('error') or 'failed'}"
                  " — queued again", file=sys.stderr)
        elif event["kind"] == "finished":
            seen["ended"] += 1
            summ = event.get("summary") or {}
            acc = (f"val {summ['val_acc']:.4f} test {summ['test_acc']:.4f}"
                   if summ.get("test_acc") is not None else (event.get("error") or ""))
            again = f" (attempt {event['attempt']})" if event.get("attempt", 1) > 1 else ""
            print(f"[{seen['ended']}/{seen['planned']}] {event['label']}: {event['status']}"
                  f"{again} {acc}".rstrip(), file=sys.stderr)

    result = run_sweep(args.spec, RunStore(args.store), backend=args.backend,
                       address=args.address, num_cpus=args.num_cpus, dry_run=args.dry_run,
                       progress=progress)
    summary = result.summary()
    if args.json:
        _print_json(summary)
    elif not args.dry_run:
        counts = ", ".join(f"{n} {state}" for state, n in sorted(summary["final"].items()))
        print(f"sweep {result.name}: {counts or 'nothing planned'}; "
              f"{len(summary['retried'])} retried; {summary['seconds']:.0f} s")
    bad = sum(n for state, n in summary["final"].items() if state != "done")
    return 1 if bad and not args.dry_run else 0


def cmd_cache_runs(args: argparse.Namespace) -> int:
    from .analysis.flatness import FlatnessSettings, measure_missing
    from .runs.cached import FLATNESS_SETTINGS
    from .runs.cached import main as regenerate_main

    settings = FlatnessSettings.from_strings(FLATNESS_SETTINGS)
    return regenerate_main(args.cached_args, measure_flatness=lambda store, ids, progress:
                           measure_missing(store, ids, settings, progress)) or 0


def cmd_pixels(args: argparse.Namespace) -> int:
    """The "pixels, no backbone" reference of embedded tasks (docs/cli.md), into a store."""
    from .analysis.pixel_baseline import (
        REFERENCE_FILE,
        read_reference,
        task_pixel_baseline,
        write_reference,
    )
    from .data.embedded import EMBEDDED_TASKS, UnknownTaskError, get_task

    tasks = args.tasks or list(EMBEDDED_TASKS)
    try:
        for t in tasks:
            get_task(t)
    except UnknownTaskError as e:
        raise SystemExit(f"error: {e}") from e
    path = Path(args.store) / REFERENCE_FILE
    try:
        records = read_reference(path)  # tasks not recomputed are kept
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    for i, task in enumerate(tasks, 1):
        print(f"[{i}/{len(tasks)}] {task} …", file=sys.stderr, flush=True)
        records[task] = task_pixel_baseline(task)
        r = records[task]
        print(f"    test {r['test_acc']:.3f}  val {r['val_acc']:.3f}  C {r['C']:g}  "
              f"chance {r['chance']:.3f}  ({r['seconds']} s)", file=sys.stderr, flush=True)
    Path(args.store).mkdir(parents=True, exist_ok=True)
    write_reference(path, list(records.values()))
    if args.json:
        _print_json(records)
    else:
        print(f"wrote {path}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    # Parsed here, not in build_parser: importing the recipe (torch, timm, the task suite)
    # would otherwise slow every other command by seconds.
    from .pretrain import add_arguments, run_from_args

    p = argparse.ArgumentParser(prog="python -m vpeft_viz pretrain",
                                description="pretrain the embedded backbone (offline recipe)")
    add_arguments(p)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(args.pretrain_args)
    record = run_from_args(args)
    if args.json:
        _print_json(record)
    return 0


def cmd_flatness(args: argparse.Namespace) -> int:
    from .analysis.flatness import FlatnessSettings, compute_flatness, load_record
    from .config import parse_overrides
    from .runs.store import RunStore

    store = RunStore(args.store)
    if args.all:
        ids = [r.id for r in store.list() if r.status().get("status") == "done"
               and r.weights_path.is_file()]
    else:
        ids = list(args.run_ids)
    if not ids:
        raise ValueError("name runs to measure, or pass --all")
    settings = FlatnessSettings.from_strings(
        {"images": str(args.images), "grid_2d": str(args.grid), **parse_overrides(args.set)})
    out = []
    for run_id in ids:
        run = store.get(run_id)
        rec = None if args.force else load_record(run.path, settings)
        if rec is None:
            def progress(stage: str, done: int, total: int, run_id: str = run_id) -> None:
                if done in (0, total):
                    print(f"{run_id}: {stage} {done}/{total}", file=sys.stderr)

            rec = compute_flatness(run.path, settings, device=args.device, progress=progress)
        sh = rec["sharpness"]
        out.append({"run_id": run_id, "val_loss": rec["trained"]["loss"],
                    "top_eigenvalue": sh["top_eigenvalue"], "trace": sh["trace"],
                    "params": rec["space"]["params"],
                    "time_s": round(sum(rec["timing_s"].values()), 1)})
    if args.json:
        _print_json(out)
    else:
        for r in out:
            print(f"{r['run_id']:<40} loss {r['val_loss']:.4f}  λmax {r['top_eigenvalue']:.4g}"
                  f"  trace {r['trace']:.4g}  ({r['params']:,} weights, {r['time_s']} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vpeft_viz",
                                description="vpeft-viz: visual PEFT lab (command line)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("methods", help="registered PEFT methods")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_methods)

    s = sub.add_parser("tasks", help="embedded tasks")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_tasks)

    s = sub.add_parser("params", help="count trainable parameters (never downloads weights)")
    s.add_argument("--backbone", default=None, help="timm model name (default: embedded)")
    s.add_argument("--method", required=True)
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="method setting")
    s.add_argument("--num-classes", type=int, default=0, help="head size (0: no head)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_params)

    s = sub.add_parser("train", help="fine-tune one method on one task into the run store")
    s.add_argument("--backbone", default=None, help="timm model name (default: embedded)")
    s.add_argument("--checkpoint", default=None, help="local weights file (offline)")
    s.add_argument("--random-init", action="store_true", help="do not load pretrained weights")
    s.add_argument("--data", required=True, help="folder path or embedded:<task>")
    s.add_argument("--normalization", default="backbone",
                   choices=("backbone", "imagenet", "none"),
                   help="input normalisation (recorded in the run)")
    s.add_argument("--method", required=True)
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="method setting")
    s.add_argument("--train-set", action="append", metavar="KEY=VALUE",
                   help="training setting (lr, batch_size, ...)")
    s.add_argument("--epochs", type=int, default=None)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--store", type=Path, default=DEFAULT_STORE)
    s.add_argument("--run-id", default=None,
                   help="the run's directory name (default: generated); must be new")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("runs", help="list runs in a store")
    s.add_argument("--store", type=Path, default=DEFAULT_STORE)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_runs)

    s = sub.add_parser("flatness", help="loss landscapes, Hessian sharpness and weight-noise "
                       "robustness of finished runs (stored with each run)")
    s.add_argument("run_ids", nargs="*", help="runs to measure")
    s.add_argument("--all", action="store_true", help="every finished run with weights")
    s.add_argument("--store", type=Path, default=DEFAULT_STORE)
    s.add_argument("--images", type=int, default=256, help="validation images (first ones)")
    s.add_argument("--grid", type=int, default=21, help="points per side of the 2-D landscape")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="other measurement setting (points_1d, radius, noise=0,0.1,..., draws, "
                   "lanczos_steps, trace_samples, seed, batch_size)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--force", action="store_true", help="recompute a stored record")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_flatness)

    s = sub.add_parser("pixels", help="the raw-pixel reference (logistic regression, no "
                       "backbone) of embedded tasks, stored in a store for the Compare page")
    s.add_argument("tasks", nargs="*", help="embedded tasks (default: the default suite)")
    s.add_argument("--store", type=Path, default=DEFAULT_STORE,
                   help="the store whose pixel_baseline.json is (re)written; the shipped "
                   "reference lives in cached_runs/")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_pixels)

    s = sub.add_parser("sweep", help="methods × tasks × seeds × settings from a TOML spec, "
                       "locally or on a Ray cluster (docs/sweeps.md)")
    s.add_argument("spec", type=Path, help="sweep spec (TOML)")
    s.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local: the store's job queue; ray: one Ray task per run")
    s.add_argument("--address", default=None,
                   help="Ray cluster to join (auto: the one `ray start` runs here; default: "
                   "start a local Ray instance)")
    s.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs of the local Ray instance (without --address; default: all)")
    s.add_argument("--store", type=Path, default=DEFAULT_STORE,
                   help="run store (on a cluster: a path every node mounts)")
    s.add_argument("--dry-run", action="store_true",
                   help="print the plan (kept / to run) and write nothing")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser("cache-runs", help="regenerate the shipped cached_runs/ store",
                       add_help=False)
    s.add_argument("cached_args", nargs=argparse.REMAINDER,
                   help="options of vpeft_viz.runs.cached (--quick, --out DIR; -h for help)")
    s.set_defaults(func=cmd_cache_runs)

    s = sub.add_parser("pretrain", help="pretrain the embedded backbone (offline recipe)",
                       add_help=False)
    s.add_argument("pretrain_args", nargs=argparse.REMAINDER,
                   help="--source, --steps, --seed, --set KEY=VALUE, --out, --json (-h for help)")
    s.set_defaults(func=cmd_pretrain)
    return p


# Commands whose own parser reads the rest of the line (argparse's REMAINDER drops a first
# argument that starts with "-").
FORWARDED = {"cache-runs": "cached_args", "pretrain": "pretrain_args"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FORWARDED:
        args = build_parser().parse_args(argv[:1])
        setattr(args, FORWARDED[argv[0]], argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as e:  # one clear line, not a traceback
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        if os.environ.get("VPEFT_VIZ_DEBUG"):
            raise
        return 1
