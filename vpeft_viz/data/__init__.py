"""Task data: folder formats, the image dataset and the embedded task suite.

A data SPEC is ``embedded:<task>`` or a folder path (VTAB-1k task folder, FGVC folder with
train/val/test.json, or an ImageFolder tree).
"""

from __future__ import annotations

from pathlib import Path

from .formats import DataError, Sample, TaskSplits, detect_format, read_task, read_vtab

EMBEDDED_PREFIX = "embedded:"

__all__ = ["DataError", "EMBEDDED_PREFIX", "Sample", "TaskSplits", "check_data_spec",
           "resolve_data"]


def check_data_spec(spec: str) -> None:
    """Fail fast (before any run exists) on a SPEC that cannot work; cheap: reads no images."""
    if spec.startswith(EMBEDDED_PREFIX):
        from .embedded import get_task

        get_task(spec[len(EMBEDDED_PREFIX):])  # raises, listing the tasks, when unknown
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

        name = spec[len(EMBEDDED_PREFIX):]
        task = read_vtab(ensure_task(name, progress=progress))
        task.name = name
        task.format = "embedded"
        return task
    check_data_spec(spec)
    return read_task(Path(spec).expanduser(), seed=seed)
