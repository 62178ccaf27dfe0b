"""Pooled embedded tasks: the default suite's tasks as one task with a union label space.

``embedded:pool`` is every task of the default suite at once; ``embedded:pool-except-<task>``
leaves one out (none of its images, none of its classes). Each task keeps its own splits
(train800 into train, val200 into val, test into test) and its classes get their own labels,
offset by the classes of the tasks before it in suite order, named ``<task>/<class>``: 9 tasks
of 800 training images make a 7,200-image, 9-task classification problem.

What it is for: a labelled source task made of everything the lab has except the task a run
is about, e.g. the default source on which PVP pre-trains its prompts
(docs/methods.md, "PVP"). Nothing is generated for a pool: it reads the member tasks'
folders (generating those on first use) and lists their images where they are.
"""

from __future__ import annotations

from collections.abc import Callable

from ..formats import Sample, TaskSplits, read_vtab
from .registry import EMBEDDED_TASKS, UnknownTaskError, ensure_task

POOL = "pool"
EXCEPT = "pool-except-"


def is_pool(name: str) -> bool:
    return name == POOL or name.startswith(EXCEPT)


def pool_name(exclude: str | None = None) -> str:
    """The embedded name of the pool without ``exclude`` (a default-suite task, or None)."""
    if exclude is None:
        return POOL
    if exclude not in EMBEDDED_TASKS:
        raise UnknownTaskError(f"cannot leave {exclude!r} out of the pool: not a task of the "
                               f"default suite ({', '.join(EMBEDDED_TASKS)})")
    return EXCEPT + exclude


def pool_members(name: str) -> tuple[str, ...]:
    """The tasks a pool name covers, in suite order; :class:`UnknownTaskError` when the name
    is not a pool of the default suite."""
    if name == POOL:
        return tuple(EMBEDDED_TASKS)
    if name.startswith(EXCEPT):
        left_out = name[len(EXCEPT):]
        pool_name(left_out)  # raises, listing the tasks, when unknown
        return tuple(t for t in EMBEDDED_TASKS if t != left_out)
    raise UnknownTaskError(f"{name!r} is not a pooled task (use {POOL!r} or "
                           f"'{EXCEPT}<task>')")


def read_pool(name: str, *, progress: Callable[[str], None] | None = None) -> TaskSplits:
    """The pooled task ``name`` (see the module docstring), its members generated if needed."""
    splits: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    class_names: list[str] = []
    notes = []
    for member in pool_members(name):
        task = read_vtab(ensure_task(member, progress=progress))
        offset = len(class_names)
        meta = EMBEDDED_TASKS[member]
        class_names += [f"{member}/{c}" for c in meta.class_names]
        for split, samples in task.splits.items():
            splits[split] += [Sample(s.path, s.label + offset, s.where) for s in samples]
        notes.append(f"{member}: labels {offset}..{len(class_names) - 1}")
    return TaskSplits(name, "embedded", ensure_task(pool_members(name)[0]).parent,
                      len(class_names), splits, class_names=class_names, notes=notes)
