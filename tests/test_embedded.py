"""Embedded task suite: VTAB-1k layout, sizes and labels, determinism, no train/test leakage,
offline sources, atomic generation. The default suite is generated once per session."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from vpeft_viz.data import embedded
from vpeft_viz.data.embedded import (
    EMBEDDED_TASKS,
    GROUPS,
    OPTIONAL_TASKS,
    SOURCE_FILES,
    TaskUnavailableError,
    UnknownTaskError,
    cache_root,
    ensure_suite,
    ensure_task,
    list_tasks,
    load_arrays,
    source_path,
    task_dir,
)
from vpeft_viz.data.formats import read_vtab

TASKS = list(EMBEDDED_TASKS)


@pytest.fixture(scope="session")
def suite_cache(tmp_path_factory) -> Path:
    """A cache folder holding the whole default suite, generated once."""
    base = tmp_path_factory.mktemp("vpeft_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VPEFT_VIZ_CACHE", str(base))
        messages: list[str] = []
        root = ensure_suite(progress=messages.append)
        assert root == base / "embedded" / embedded.CACHE_VERSION
        assert any("digits" in m for m in messages)
    return base


@pytest.fixture
def suite(suite_cache, monkeypatch) -> Path:
    """The session's generated suite, as the current cache."""
    monkeypatch.setenv("VPEFT_VIZ_CACHE", str(suite_cache))
    return cache_root()


def _lines(path: Path) -> list[tuple[str, int]]:
    rows = [line.split(" ") for line in path.read_text().splitlines()]
    return [(rel, int(label)) for rel, label in rows]


def _hashes(images: np.ndarray) -> set[str]:
    return {hashlib.sha1(img.tobytes()).hexdigest() for img in images}


def _file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_groups_have_at_least_two_tasks_each():
    groups = [t.group for t in EMBEDDED_TASKS.values()]
    assert len(EMBEDDED_TASKS) >= 6
    for g in GROUPS:
        assert groups.count(g) >= 2, g
    assert groups == sorted(groups, key=GROUPS.index), "default suite is ordered by group"


def test_sources_are_bundled_files():
    """Every source file is inside an installed package: nothing is ever downloaded."""
    for ref in SOURCE_FILES:
        assert source_path(ref).is_file(), ref
    used = {ref for t in EMBEDDED_TASKS.values() for ref in t.source_files}
    assert used == set(SOURCE_FILES)


@pytest.mark.parametrize("name", TASKS)
def test_task_folder_in_vtab_layout(suite, name):
    task = EMBEDDED_TASKS[name]
    folder = task_dir(name)
    assert folder == suite / name
    train = _lines(folder / "train800.txt")
    val = _lines(folder / "val200.txt")
    test = _lines(folder / "test.txt")
    assert (len(train), len(val), len(test)) == (800, 200, task.test_size)
    assert _lines(folder / "train800val200.txt") == train + val
    paths = [rel for rel, _ in train + val + test]
    assert len(set(paths)) == len(paths) and all(rel.startswith("images/") for rel in paths)
    assert all((folder / rel).is_file() for rel in paths)
    for rows in (train, val, test):
        assert all(0 <= y < task.num_classes for _, y in rows)
    assert {y for _, y in train} == set(range(task.num_classes)), "every class in train800"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["sizes"] == {"train": 800, "val": 200, "test": task.test_size}
    assert not list(suite.glob(f".{name}.*")), "no temporary folder left behind"

    read = read_vtab(folder)  # the project's plain VTAB-1k reader accepts it
    assert read.num_classes == task.num_classes
    assert [len(read.splits[s]) for s in ("train", "val", "test")] == [800, 200, task.test_size]


@pytest.mark.parametrize("name", TASKS)
def test_images_and_no_train_test_duplicates(suite, name):
    fit, fit_y = load_arrays(name, "trainval")
    test, test_y = load_arrays(name, "test")
    for images in (fit, test):
        assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
        assert images.std() > 1, "not blank"
    assert len(fit_y) == 1000 and len(test_y) == EMBEDDED_TASKS[name].test_size
    assert not _hashes(fit) & _hashes(test), "an image appears in both train/val and test"
    train, _ = load_arrays(name, "train800")
    assert np.array_equal(train, fit[:800])


def test_generation_is_deterministic(tmp_path, monkeypatch):
    """Same bytes in two cache roots (the suite was also checked across processes)."""
    folders = []
    for run in ("a", "b"):
        monkeypatch.setenv("VPEFT_VIZ_CACHE", str(tmp_path / run))
        folders.append(ensure_task("location"))
    first, second = (_file_hashes(f) for f in folders)
    assert len(first) == 800 + 200 + 1000 + 5  # images, four split files, meta.json
    assert first == second


def test_ensure_task_generates_once(suite):
    folder = task_dir("faces")
    before = (folder / "meta.json").stat().st_mtime_ns
    called: list[str] = []
    assert ensure_task("faces", progress=called.append) == folder
    assert (folder / "meta.json").stat().st_mtime_ns == before and not called


def test_concurrent_generation_ends_with_one_complete_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("VPEFT_VIZ_CACHE", str(tmp_path))
    results: list[Path] = []
    errors: list[Exception] = []

    def work() -> None:
        try:
            results.append(ensure_task("faces"))
        except Exception as e:  # reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert len(_lines(results[0] / "test.txt")) == EMBEDDED_TASKS["faces"].test_size
    assert sorted(p.name for p in cache_root().iterdir()) == ["faces"]


def test_cache_root_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("VPEFT_VIZ_CACHE", str(tmp_path))
    assert cache_root() == tmp_path / "embedded" / embedded.CACHE_VERSION
    monkeypatch.delenv("VPEFT_VIZ_CACHE")
    home_cache = Path.home() / ".cache" / "vpeft_viz"
    assert cache_root() == home_cache / "embedded" / embedded.CACHE_VERSION


def test_list_tasks_fields():
    rows = list_tasks()
    assert [r["name"] for r in rows if r["default"]] == TASKS
    for r in rows:
        assert set(r) >= {"name", "group", "description", "source", "licence", "num_classes",
                          "class_names", "sizes", "available"}
        assert r["group"] in GROUPS
        assert r["description"] and "\n" not in r["description"]
        assert r["source"] and r["licence"]
        assert len(r["class_names"]) == r["num_classes"] >= 2
        assert r["sizes"]["train"] == 800 and r["sizes"]["val"] == 200 and r["sizes"]["test"] > 0
        if r["default"]:
            assert r["available"] is True
    json.dumps(rows)  # the `tasks --json` command prints them as they are


def test_unknown_task_error_lists_the_tasks():
    with pytest.raises(UnknownTaskError) as err:
        ensure_task("imagenet")
    message = str(err.value)
    assert "imagenet" in message
    for name in (*EMBEDDED_TASKS, *OPTIONAL_TASKS):
        assert name in message
    with pytest.raises(UnknownTaskError):
        task_dir("nope")


def test_unknown_split_is_a_clear_error(suite):
    with pytest.raises(ValueError, match="trainval"):
        load_arrays("digits", "holdout")


def test_fashion_mnist_is_optional_and_skips_cleanly(tmp_path, monkeypatch):
    assert "fashion_mnist" in OPTIONAL_TASKS and "fashion_mnist" not in EMBEDDED_TASKS
    monkeypatch.setenv("VPEFT_VIZ_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded.sources, "FASHION_MNIST_DIR", tmp_path / "absent")
    row = next(r for r in list_tasks() if r["name"] == "fashion_mnist")
    assert row["available"] is False and row["default"] is False
    with pytest.raises(TaskUnavailableError, match="dataset-fashion-mnist"):
        ensure_task("fashion_mnist")
    assert not (cache_root() / "fashion_mnist").exists()


@pytest.mark.skipif(not OPTIONAL_TASKS["fashion_mnist"].available(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_generates_when_installed(tmp_path, monkeypatch):
    monkeypatch.setenv("VPEFT_VIZ_CACHE", str(tmp_path))
    train, labels = load_arrays("fashion_mnist", "train")
    assert train.shape == (800, 32, 32, 3) and set(labels.tolist()) == set(range(10))
    test, _ = load_arrays("fashion_mnist", "test")
    assert len(test) == 1000 and not _hashes(train) & _hashes(test)
