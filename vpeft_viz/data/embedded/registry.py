"""The embedded task registry: what a task is, the default and optional suites, and the
on-disk cache in VTAB-1k layout (see :mod:`vpeft_viz.data.embedded`)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .sources import IMAGE_SIZE, TRAIN_SIZE, VAL_SIZE, Splits, source_path

GROUPS = ("natural", "specialized", "structured")
CACHE_VERSION = "v2"  # bump whenever generation changes, so stale caches are never read
SPLIT_FILES = {"train": "train800.txt", "val": "val200.txt",
               "trainval": "train800val200.txt", "test": "test.txt"}

Progress = Callable[[str], None]


class UnknownTaskError(KeyError):
    """No embedded task has this name; the message lists the ones that exist."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class TaskUnavailableError(RuntimeError):
    """An optional task's source is not installed on this machine."""


@dataclass(frozen=True)
class EmbeddedTask:
    """One task of the suite: what it is, where its pixels come from, how to draw it."""

    name: str
    group: str
    description: str
    source: str
    licence: str
    num_classes: int
    class_names: tuple[str, ...]
    test_size: int
    source_files: tuple[str, ...]  # "package:file" in a package's data folder, or "fashion:file"
    build: Callable[[np.random.SeedSequence], Splits] = field(repr=False, compare=False)

    @property
    def seed(self) -> int:
        """Fixed per task (CRC-32 of the name), independent of the other tasks."""
        return zlib.crc32(self.name.encode())

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": TRAIN_SIZE, "val": VAL_SIZE, "test": self.test_size}

    def available(self) -> bool:
        """Whether every source file is present (no download is ever attempted)."""
        return all(source_path(ref).is_file() for ref in self.source_files)

    def generate(self) -> Splits:
        """The task's images and labels in memory: ``{"train", "val", "test"}`` → arrays."""
        return self.build(np.random.SeedSequence(self.seed))


EMBEDDED_TASKS: dict[str, EmbeddedTask] = {}  # the default suite, ordered by group
OPTIONAL_TASKS: dict[str, EmbeddedTask] = {}  # listed, generated on request, never by default


def _task(name: str, group: str, *, classes: Iterable[str], test_size: int, description: str,
          source: str, licence: str, files: tuple[str, ...] = (), optional: bool = False):
    """Register the decorated ``build(seed_sequence) -> Splits`` function as a task."""
    assert group in GROUPS, group

    def wrap(build: Callable[[np.random.SeedSequence], Splits]):
        names = tuple(classes)
        task = EmbeddedTask(name, group, description, source, licence, len(names), names,
                            test_size, files, build)
        (OPTIONAL_TASKS if optional else EMBEDDED_TASKS)[name] = task
        return build

    return wrap


# -- cache --------------------------------------------------------------------------------
def cache_root() -> Path:
    """``$VPEFT_VIZ_CACHE/embedded/<version>``, else ``~/.cache/vpeft_viz/embedded/<version>``."""
    base = os.environ.get("VPEFT_VIZ_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "vpeft_viz"
    return root / "embedded" / CACHE_VERSION


def get_task(name: str) -> EmbeddedTask:
    """The default or optional task of that name; :class:`UnknownTaskError` otherwise."""
    task = EMBEDDED_TASKS.get(name) or OPTIONAL_TASKS.get(name)
    if task is None:
        optional = f" (optional: {', '.join(OPTIONAL_TASKS)})" if OPTIONAL_TASKS else ""
        raise UnknownTaskError(f"unknown embedded task {name!r}; available: "
                               f"{', '.join(EMBEDDED_TASKS)}{optional}")
    return task


def task_dir(name: str) -> Path:
    return cache_root() / get_task(name).name


def _write_task(task: EmbeddedTask, splits: Splits, folder: Path) -> None:
    (folder / "images").mkdir(parents=True)
    lines: dict[str, list[str]] = {}
    index = 0
    for split in ("train", "val", "test"):
        images, labels = splits[split]
        assert images.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
        assert len(images) == task.sizes[split], (task.name, split, len(images))
        rows = []
        for img, y in zip(images, labels):
            rel = f"images/{index:05d}.png"
            Image.fromarray(img).save(folder / rel, compress_level=1)
            rows.append(f"{rel} {int(y)}\n")
            index += 1
        lines[split] = rows
    lines["trainval"] = lines["train"] + lines["val"]
    for split, file in SPLIT_FILES.items():
        (folder / file).write_text("".join(lines[split]))
    meta = {"name": task.name, "group": task.group, "version": CACHE_VERSION,
            "seed": task.seed, "num_classes": task.num_classes,
            "class_names": list(task.class_names), "sizes": task.sizes,
            "description": task.description, "source": task.source, "licence": task.licence}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")


def ensure_task(name: str, *, progress: Progress | None = None) -> Path:
    """The task's folder in VTAB-1k layout, generated on first use.

    Generation writes into a temporary folder beside the final one and renames it into
    place, so a crash leaves nothing half-written and concurrent callers (two processes
    generating at once) each end up with the same, complete folder.
    """
    task = get_task(name)
    dest = task_dir(name)
    if (dest / "meta.json").is_file():
        return dest
    if not task.available():
        missing = [str(source_path(r)) for r in task.source_files if not source_path(r).is_file()]
        hint = " (install Debian's dataset-fashion-mnist)" if name == "fashion_mnist" else ""
        raise TaskUnavailableError(f"embedded task {name!r} needs {', '.join(missing)}{hint}")
    if progress:
        progress(f"generating embedded task {name} (first use only)")
    splits = task.generate()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=dest.parent))
    try:
        _write_task(task, splits, tmp)
        if dest.exists() and not (dest / "meta.json").is_file():  # left by something else
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / "meta.json").is_file():  # not a concurrent generator's result
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        progress(f"embedded task {name} ready in {dest}")
    return dest


def ensure_suite(progress: Progress | None = None) -> Path:
    """Generate every task of the default suite that is not cached yet; return the root."""
    for name in EMBEDDED_TASKS:
        ensure_task(name, progress=progress)
    return cache_root()


def list_tasks() -> list[dict]:
    """Every task, default suite first, with what the ``tasks`` command and the UI show."""
    rows = []
    for default, tasks in ((True, EMBEDDED_TASKS), (False, OPTIONAL_TASKS)):
        for t in tasks.values():
            rows.append({"name": t.name, "group": t.group, "description": t.description,
                         "source": t.source, "licence": t.licence,
                         "num_classes": t.num_classes, "class_names": list(t.class_names),
                         "sizes": t.sizes, "available": t.available(), "default": default})
    return rows


def load_arrays(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N×32×32×3 images and int64 labels of one split (``train``, ``val``, ``trainval``,
    ``test``, or a VTAB-1k file stem such as ``train800``), generating the task if needed."""
    stems = {Path(f).stem: k for k, f in SPLIT_FILES.items()}
    key = stems.get(split, split)
    if key not in SPLIT_FILES:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLIT_FILES)}")
    folder = ensure_task(name)
    rows = [line.split() for line in (folder / SPLIT_FILES[key]).read_text().splitlines()]
    images = np.stack([np.asarray(Image.open(folder / rel).convert("RGB")) for rel, _ in rows])
    return images, np.array([int(y) for _, y in rows], dtype=np.int64)
