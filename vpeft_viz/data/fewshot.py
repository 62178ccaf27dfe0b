"""Few-shot training splits: k images per class drawn from a task's training split.

The few-shot protocol of VPT (https://arxiv.org/abs/2203.12119) and PVP
(https://arxiv.org/abs/2304.13639) trains on k ∈ {1, 2, 4, 8, 16} labelled images per class.
Here any task can be trained that way (the ``shots`` training setting, docs/cli.md): k images
of every class are drawn from its training split (``train800`` of a VTAB-1k or embedded task),
while validation (``val200``) and test stay as they are, so few-shot runs are selected and
measured on the same images as full ones.

The draw is seeded: the images of each class are shuffled by their own stream (a string seed
``shots/<seed>/<label>``, hashed by Python's ``random``, stable across runs and platforms) and
the first k are kept, in the split file's order. Hence the same seed gives the same split on
every machine, the k = 1 images are among the k = 2 ones and so on (nested splits: accuracy
against k compares growing sets, not unrelated ones), and a class's draw does not depend on
the other classes. A class with fewer than k training images is an error naming it.
"""

from __future__ import annotations

import dataclasses
import random

from .formats import DataError, Sample, TaskSplits

PAPER_SHOTS = (1, 2, 4, 8, 16)  # the k of VPT's and PVP's few-shot tables


def few_shot_samples(samples: list[Sample], num_classes: int, shots: int, seed: int, *,
                     what: str = "training split",
                     class_names: list[str] | None = None) -> list[Sample]:
    """``shots`` samples of every class in ``range(num_classes)``, drawn by ``seed`` (see the
    module docstring), in their original order. Raises :class:`DataError` naming the classes
    with fewer than ``shots`` samples."""
    if shots < 1:
        raise ValueError(f"shots must be at least 1, got {shots}")
    by_class: dict[int, list[int]] = {c: [] for c in range(num_classes)}
    for i, s in enumerate(samples):
        by_class.setdefault(s.label, []).append(i)
    short = {c: len(ix) for c, ix in by_class.items() if len(ix) < shots}
    if short:
        def name(c: int) -> str:
            return f"{c} ({class_names[c]})" if class_names and c < len(class_names) else str(c)

        listed = ", ".join(f"class {name(c)}: {n}" for c, n in sorted(short.items())[:10])
        more = f" and {len(short) - 10} more" if len(short) > 10 else ""
        raise DataError(f"train.shots={shots} needs {shots} images of every class in the "
                        f"{what}, but {len(short)} class(es) have fewer ({listed}{more}); "
                        f"lower train.shots to at most {min(short.values())}")
    keep: list[int] = []
    for c, ix in by_class.items():
        ix = list(ix)
        random.Random(f"shots/{seed}/{c}").shuffle(ix)
        keep += ix[:shots]
    return [samples[i] for i in sorted(keep)]


def apply_shots(task: TaskSplits, shots: int | None, seed: int) -> TaskSplits:
    """The task with its training split cut to ``shots`` images per class (``None``: the task
    unchanged); validation and test are the same lists."""
    if not shots:
        return task
    train = few_shot_samples(task.splits["train"], task.num_classes, shots, seed,
                             what=f"training split of {task.name}",
                             class_names=task.class_names)
    note = (f"few-shot: {shots} training image(s) per class ({len(train)} of "
            f"{len(task.splits['train'])}), drawn with split seed {seed}")
    return dataclasses.replace(task, splits={**task.splits, "train": train},
                               notes=[*task.notes, note])
