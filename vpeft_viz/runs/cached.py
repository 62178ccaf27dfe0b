"""The shipped ``cached_runs/`` store: its recipe, as data, and how to regenerate it.

``python -m vpeft_viz cache-runs`` (or ``make cached-runs``) calls :func:`regenerate`:
every baseline method on one embedded task per VTAB group, several seeds, the default
10-epoch recipe, on the embedded backbone with its shipped weights. The runs are written
into ``.cached_runs.partial/`` beside the store and swapped in at the end, so the dashboard
never sees a half-built store; an interrupted regeneration resumes from the runs it
finished. Run ids are deterministic (``<task>-<method>-s<seed>``), so a regenerated store
diffs cleanly.

To keep the repository small, a run whose weights file exceeds :data:`WEIGHT_LIMIT_BYTES`
(full fine-tuning) ships without it: its summary still records ``weight_bytes`` and says
``"weights_shipped": false``.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import CACHED_STORE, PIXEL_REFERENCE_FILE
from .recipe import same_recipe
from .store import RunStore, atomic_write_bytes, atomic_write_json, read_json

# The whole shipped set: every registered method, with the seeds its class declares
# (``cached_seeds``: two for the baselines; one for the slowest ones — whole-backbone
# gradients, long prompt sequences — and for the methods with their own view), on one
# embedded task per VTAB group, each for EPOCHS epochs.
TASKS = ("digits", "retinopathy", "count")  # natural, specialized, structured
EPOCHS = 10


def default_recipe() -> tuple[tuple[str, str, tuple[int, ...], int], ...]:
    """(method, embedded task, seeds, epochs) for every run of the shipped store, derived from
    the method registry (a method with no ``cached_seeds`` is not shipped)."""
    from ..methods import get_method_class, method_names

    seeds = {m: tuple(get_method_class(m).cached_seeds) for m in method_names()}
    return tuple((m, task, seeds[m], EPOCHS) for task in TASKS for m in seeds if seeds[m])


WEIGHT_LIMIT_BYTES = 1_000_000

# Flatness records shipped with the store (the Flatness page opens on them; docs/
# lowbit-flatness.md): every seed-0 run of these methods, variants included, measured after
# training with light settings that take seconds per run on two CPU cores.
FLATNESS_METHODS = ("lora", "adaptformer", "bi-lora", "bi-adaptformer")
FLATNESS_SETTINGS = {"images": "64", "grid_2d": "7", "points_1d": "41", "draws": "2",
                     "lanczos_steps": "8", "trace_samples": "4"}
COMMAND = "python -m vpeft_viz cache-runs"

Progress = Callable[[int, int, str], None]  # (runs finished, runs planned, message)
MeasureFlatness = Callable[[RunStore, Sequence[str], "Progress | None"], list[str]]


def variant_specs(*, quick: bool = False) -> list[dict[str, Any]]:
    """The extra shipped runs methods declare at other settings (``cached_variants``): method
    settings on some tasks with seed 0, or also training settings (``epochs``, ``shots``, …)
    and seeds of their own. ``quick``: the first seed, one epoch."""
    from ..methods import get_method_class, method_names

    out = []
    for method in method_names():
        for label, settings, tasks, *more in get_method_class(method).cached_variants:
            train, seeds = (dict(more[0]), tuple(more[1])) if more else ({}, (0,))
            epochs = int(train.pop("epochs", EPOCHS))
            for task in tasks:
                for seed in seeds[:1] if quick else seeds:
                    out.append({"method": method, "task": task, "seed": int(seed),
                                "epochs": 1 if quick else epochs, "settings": dict(settings),
                                "train": train, "label": label,
                                "run_id": f"{task}-{method}-{label}-s{seed}"})
    return out


def planned_runs(recipe: Sequence[tuple[str, str, Sequence[int], int]] | None = None, *,
                 quick: bool = False) -> list[dict[str, Any]]:
    """One entry per run: method, task, seed, epochs, settings and its deterministic run id.
    ``quick`` keeps the first seed and one epoch (to check the recipe end to end). The
    default recipe includes the methods' declared variants."""
    out = []
    for method, task, seeds, epochs in (default_recipe() if recipe is None else recipe):
        for seed in (seeds[:1] if quick else seeds):
            out.append({"method": method, "task": task, "seed": int(seed),
                        "epochs": 1 if quick else int(epochs), "settings": {}, "train": {},
                        "run_id": f"{task}-{method}-s{seed}"})
    return out + (variant_specs(quick=quick) if recipe is None else [])


def flatness_run_ids(specs: Sequence[dict[str, Any]]) -> list[str]:
    """The planned runs that ship with a flatness record (:data:`FLATNESS_METHODS`)."""
    return [s["run_id"] for s in specs if s["method"] in FLATNESS_METHODS and s["seed"] == 0]


def _run_config(spec: dict[str, Any], pretrained: bool, device: str = "auto") -> dict[str, Any]:
    from .execute import make_run_config

    return make_run_config(method=spec["method"], data=f"embedded:{spec['task']}",
                           pretrained=pretrained, method_config=spec.get("settings") or None,
                           train={**spec.get("train", {}), "epochs": spec["epochs"],
                                  "seed": spec["seed"], "device": device})


def _finished(store: RunStore, spec: dict[str, Any], pretrained: bool,
              device: str = "auto") -> bool:
    """A stored run that is exactly what the recipe would create now, and done: the same
    recipe (``runs/recipe.py``), with today's method and training defaults filled in (so a
    run made under an older default is redone)."""
    try:
        run = store.get(spec["run_id"])
        return (run.status().get("status") == "done" and run.summary() is not None
                and same_recipe(run.config, _run_config(spec, pretrained, device)))
    except Exception:
        return False


def _sources(store: RunStore, run_ids: Sequence[str]) -> list[str]:
    """The source runs (``summary.json``'s ``source_run``, PVP's pre-trained prompts) that
    the given runs started from and that live in ``store``: trained there on first use
    (vpeft_viz/runs/sources.py), kept with the runs that need them."""
    out: list[str] = []
    for run_id in run_ids:
        try:
            source = (store.get(run_id).summary() or {}).get("source_run")
        except Exception:
            continue
        if source and source not in out and (store.root / source / "config.json").is_file():
            out.append(source)
    return out


def regenerate(out: Path = CACHED_STORE, *, quick: bool = False, progress: Progress | None = None,
               recipe: Sequence[tuple[str, str, Sequence[int], int]] | None = None,
               update: bool = False, device: str = "auto",
               measure_flatness: MeasureFlatness | None = None) -> dict[str, Any]:
    """Run ``recipe`` into a fresh store at ``out`` (replacing it at the end); returns the
    manifest written to ``out/manifest.json``.

    ``update`` starts from the runs already in ``out``: a run whose recorded method, method
    settings, backbone and training recipe equal what the recipe would create now (today's
    defaults filled in) is kept; missing runs and runs made under other settings are
    trained. ``device`` (``auto``, ``cpu``, ``cuda``) is recorded in every run's training
    settings. ``measure_flatness(store, run_ids, progress)`` (given by the command line,
    which may use the analysis layer; returns the ids measured) computes the shipped
    flatness records (:data:`FLATNESS_SETTINGS`) that are missing.

    Needs the embedded backbone's weights, except with ``quick`` (first seed, one epoch),
    which falls back to a random-init backbone when they are missing — a quick store checks
    the recipe and the dashboard, its numbers mean nothing.
    """
    from ..backbones import EMBEDDED_WEIGHTS
    from .execute import execute_run, versions

    specs = planned_runs(recipe, quick=quick)
    recipe_is_default = recipe is None
    recipe = default_recipe() if recipe is None else recipe
    pretrained = EMBEDDED_WEIGHTS.is_file()
    if not pretrained and not quick:
        raise RuntimeError(f"embedded backbone weights missing at {EMBEDDED_WEIGHTS}; cached "
                           "runs need them (use --quick to check the recipe without them)")
    out = Path(out)
    partial = out.parent / f".{out.name}.partial"
    if update and out.is_dir() and not partial.exists():
        shutil.copytree(out, partial)
    store = RunStore(partial)
    if (out / PIXEL_REFERENCE_FILE).is_file():  # backbone-independent: carried over
        shutil.copy2(out / PIXEL_REFERENCE_FILE, partial / PIXEL_REFERENCE_FILE)
    start = time.time()
    trained: list[str] = []
    for i, spec in enumerate(specs):
        label = f"{spec['method']} on {spec['task']}, seed {spec['seed']}"
        if spec["settings"] or spec.get("train"):
            label += " (" + ", ".join(f"{k}={v}" for k, v in {**spec["settings"],
                                                              **spec["train"]}.items()) + ")"
        if _finished(store, spec, pretrained, device):
            if progress:
                progress(i + 1, len(specs), f"kept {label} (same settings)")
            continue
        shutil.rmtree(partial / spec["run_id"], ignore_errors=True)
        if progress:
            progress(i, len(specs), f"training {label}")
        run = store.create(_run_config(spec, pretrained, device), run_id=spec["run_id"])
        summary = execute_run(run)
        trained.append(spec["run_id"])
        shipped = summary["weight_bytes"] <= WEIGHT_LIMIT_BYTES
        if not shipped:
            run.weights_path.unlink()
        run.write_summary({**summary, "weights_shipped": shipped})
        if progress:
            progress(i + 1, len(specs), f"{label}: test {summary['test_acc']:.3f}")

    # flatness records: the shipped store's (default recipe), not a quick check's
    after = (None if progress is None else  # the bar stays full; the message says which
             lambda i, n, message: progress(len(specs), len(specs), f"{message} ({i + 1}/{n})"))
    measured = (measure_flatness(store, flatness_run_ids(specs), after)
                if measure_flatness and recipe_is_default and not quick else [])

    previous = read_json(partial / "manifest.json", default=None) if update else None
    manifest = {"command": COMMAND + (" --quick" if quick else "") + (" --update" if update
                                                                       else ""), "quick": quick,
                "pretrained": pretrained, "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
                "generation_time_s": round(time.time() - start, 1),
                "weight_limit_bytes": WEIGHT_LIMIT_BYTES,
                "recipe": [{"method": m, "task": t, "seeds": list(s), "epochs": e}
                           for m, t, s, e in recipe],
                "variants": [{k: s[k] for k in ("run_id", "method", "task", "settings",
                                                "train")}
                             for s in specs if s["settings"] or s.get("train")],
                "runs": [s["run_id"] for s in specs], "trained": trained,
                "flatness": {"settings": FLATNESS_SETTINGS, "runs": flatness_run_ids(specs)
                             if recipe_is_default and not quick else [], "measured": measured},
                "kept": [s["run_id"] for s in specs if s["run_id"] not in trained],
                "sources": _sources(store, [s["run_id"] for s in specs]),
                "versions": versions()}
    if previous and isinstance(previous, dict) and previous.get("generated"):
        manifest["previous_generation"] = previous["generated"]
    planned = {s["run_id"] for s in specs} | set(manifest["sources"])
    for stale in store.list():  # left by an interrupted attempt under an older recipe
        if stale.id not in planned:
            shutil.rmtree(stale.path)
    atomic_write_json(partial / "manifest.json", manifest)
    write_readme(partial)
    _swap_in(partial, out)
    return manifest


def _swap_in(new: Path, out: Path) -> None:
    """Replace ``out`` by ``new`` with two renames (the old store is removed afterwards)."""
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def readme() -> str:
    """The store's README.md, describing the recipe it was generated from."""
    from ..methods import get_method_class

    by_seeds: dict[tuple[int, ...], list[str]] = {}
    for method, _task, seeds, _epochs in default_recipe():
        names = by_seeds.setdefault(tuple(seeds), [])
        if method not in names:
            names.append(method)
    methods = "; ".join(
        f"{', '.join(names)} with seed{'s' if len(s) > 1 else ''} {', '.join(map(str, s))}"
        for s, names in by_seeds.items())
    views = sorted({m for names in by_seeds.values() for m in names
                    if get_method_class(m).view_page})
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for spec in variant_specs():  # one entry per variant, its tasks and seeds together
        groups.setdefault((spec["method"], spec["label"]), []).append(spec)
    variants = "; ".join(
        f"`<task>-{method}-{label}-s<seed>` (" + ", ".join(f"{k}={v}" for k, v in {
            **specs[0]["settings"], **specs[0]["train"],
            **({"epochs": specs[0]["epochs"]} if specs[0]["epochs"] != EPOCHS else {})
        }.items()) + f"; {', '.join(dict.fromkeys(s['task'] for s in specs))}; seed"
        + ("s " if len({s["seed"] for s in specs}) > 1 else " ")
        + ", ".join(str(x) for x in sorted({s["seed"] for s in specs})) + ")"
        for (method, label), specs in groups.items())
    return f"""# cached_runs/ — the shipped run store

A read-only store of finished runs in the run-directory format (see `docs/run-store.md`),
shipped so the dashboard has something to compare the moment it opens. Regenerate it from
the repository root with

    {COMMAND}        # or: make cached-runs

which runs the recipe in `vpeft_viz/runs/cached.py`, derived from each method's
`cached_seeds`:

- methods: {methods} (the methods with their own view: {", ".join(views)});
- tasks: {", ".join(TASKS)} (embedded; one per VTAB group: natural, specialized, structured);
- {EPOCHS} epochs each, default training recipe and method settings, plus the extra runs
  methods declare at other settings (`cached_variants`): {variants or "none"};
- the embedded backbone with its shipped weights.

That is {len(planned_runs())} runs: most take about a minute on two quiet CPU cores, the
methods that train in rounds (E²VPT's pruning with rewind) a few times that.
Runs go into `.cached_runs.partial/` first and replace this folder at the end; an
interrupted regeneration resumes. `--update` keeps the runs whose settings equal today's
recipe and defaults and trains only the missing and changed ones. `--quick` (first seed, one
epoch) checks the recipe.

- `manifest.json`: the recipe, when and how it was generated, with the versions used.
- `{PIXEL_REFERENCE_FILE}`: the "pixels, no backbone" reference of each embedded task
  (logistic regression on raw pixels, `python -m vpeft_viz pixels --store cached_runs`);
  it does not depend on the backbone, so regeneration keeps it.
- `<task>-<method>-s<seed>/`: one run each (config, status, metrics, summary, eval).
- `pool-except-<task>-<method>-s<seed>-<hash>/`: source runs that shipped runs started from
  (PVP's prompts pre-trained on the other embedded tasks pooled), trained on first use by
  the run that needed them and listed under `sources` in the manifest.
- Weights files larger than {WEIGHT_LIMIT_BYTES:,} bytes are not shipped (full fine-tuning, HST):
  such a run's `summary.json` still gives `weight_bytes` and says `"weights_shipped": false`.
- `artifacts/flatness.json` of every seed-0 run of {", ".join(FLATNESS_METHODS)}: the
  Flatness page's record (docs/lowbit-flatness.md), measured after training with
  {", ".join(f"{k}={v}" for k, v in FLATNESS_SETTINGS.items())}.
- Model selection: each run keeps the epoch with the best validation accuracy and reports
  its test accuracy once.
"""


def write_readme(out: Path) -> None:
    atomic_write_bytes(Path(out) / "README.md", readme().encode())


def main(argv: Sequence[str] | None = None,
         measure_flatness: MeasureFlatness | None = None) -> int:
    """``python -m vpeft_viz cache-runs [--quick] [--out DIR]``: regenerate with a bar (the
    command passes ``measure_flatness``; without it the flatness records are not made)."""
    import argparse

    from tqdm import tqdm

    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="first seed, one epoch (a check)")
    p.add_argument("--out", type=Path, default=CACHED_STORE, help="store to (re)generate")
    p.add_argument("--update", action="store_true",
                   help="keep the runs already there whose settings equal today's recipe and "
                        "defaults; train only the missing and changed ones")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the runs train (recorded in each run)")
    args = p.parse_args(argv)
    bar = tqdm(total=len(planned_runs(quick=args.quick)), unit="run", file=sys.stderr)

    def progress(done: int, total: int, message: str) -> None:
        bar.n = done
        bar.set_description(message)
        bar.refresh()

    try:
        manifest = regenerate(args.out, quick=args.quick, progress=progress,
                              update=args.update, device=args.device,
                              measure_flatness=measure_flatness)
    finally:
        bar.close()
    print(f"{len(manifest['runs'])} runs in {args.out} ({len(manifest['trained'])} trained, "
          f"{len(manifest['kept'])} kept; {manifest['generation_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
