"""Task data: folder formats, the image dataset and the embedded task suite.

A data SPEC is ``embedded:<task>``, ``embedded:pool`` / ``embedded:pool-except-<task>`` (the
default suite pooled, see :mod:`.embedded.pool`) or a folder path (VTAB-1k task folder, FGVC
folder with train/val/test.json, or an ImageFolder tree).
"""

from __future__ import annotations

from pathlib import Path

from .formats import DataError, Sample, TaskSplits, detect_format, read_task, read_vtab

EMBEDDED_PREFIX = "embedded:"

__all__ = ["DataError", "EMBEDDED_PREFIX", "Sample", "TaskSplits", "check_data_spec",
           "check_task_files", "resolve_data"]

# (path, mtime_ns, size) → hash of an image that decoded: launching many runs on one folder
# decodes each image once per process, not once per run.
_checked: dict[tuple[str, int, int], str] = {}
_CHECKED_MAX = 200_000


def check_data_spec(spec: str) -> None:
    """Fail fast (before any run exists) on a SPEC that cannot work; cheap: reads no images."""
    if spec.startswith(EMBEDDED_PREFIX):
        from .embedded import get_task
        from .embedded.pool import is_pool, pool_members

        name = spec[len(EMBEDDED_PREFIX):]
        if is_pool(name):
            pool_members(name)  # raises, listing the tasks, when it leaves out an unknown one
        else:
            get_task(name)  # raises, listing the tasks, when unknown
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"data folder not found: {path} (or use embedded:<task>; "
                        "`python -m vpeft_viz tasks` lists them)")
    detect_format(path)


def resolve_data(spec: str, *, seed: int = 0, progress=None) -> TaskSplits:
    """Read the task a SPEC names, generating an embedded task on first use."""
    if spec.startswith(EMBEDDED_PREFIX):
        from .embedded import ensure_task
        from .embedded.pool import is_pool, read_pool

        name = spec[len(EMBEDDED_PREFIX):]
        if is_pool(name):  # several embedded tasks as one (data/embedded/pool.py)
            return read_pool(name, progress=progress)
        task = read_vtab(ensure_task(name, progress=progress))
        task.name = name
        task.format = "embedded"
        return task
    check_data_spec(spec)
    return read_task(Path(spec).expanduser(), seed=seed)


def check_task_files(spec: str, *, seed: int = 0) -> list[str]:
    """Decode every image of every split of a folder task now, before any run exists.

    A file that cannot be decoded raises :class:`DataError` naming it and the split file and
    line listing it (otherwise a broken test image surfaces only after training). Returns
    warnings to record in the run: the task's own (e.g. class labels absent from training)
    and images shared between splits (same file or same bytes). Embedded tasks are
    generated and checked by this package, so they are not decoded again.
    """
    if spec.startswith(EMBEDDED_PREFIX):
        return []
    from .dataset import check_image

    task = resolve_data(spec, seed=seed)
    first: dict[str, tuple[str, Path]] = {}  # digest → (split, path) of its first occurrence
    overlaps: dict[tuple[str, str], list[str]] = {}
    for split in ("train", "val", "test"):
        for sample in task.splits[split]:
            try:
                st = sample.path.stat()
            except OSError as e:
                raise DataError(f"{sample.where or sample.path}: cannot read image "
                                f"{sample.path}: {e.strerror}") from None
            key = (str(sample.path), st.st_mtime_ns, st.st_size)
            digest = _checked.get(key)
            if digest is None:
                digest = check_image(sample.path, sample.where)
                if len(_checked) >= _CHECKED_MAX:
                    _checked.clear()
                _checked[key] = digest
            seen = first.setdefault(digest, (split, sample.path))
            if seen[0] != split:
                how = "same file" if seen[1] == sample.path else f"same bytes as {seen[1]}"
                overlaps.setdefault((seen[0], split), []).append(f"{sample.path} ({how})")
    warnings = [f"{len(items)} image(s) of the {b} split also occur in the {a} split, "
                f"e.g. {items[0]}" for (a, b), items in overlaps.items()]
    return task.warnings + warnings
