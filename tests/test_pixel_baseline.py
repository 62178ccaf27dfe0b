"""The raw-pixel reference: C chosen on val only, test scored once, chance level stated."""

from __future__ import annotations

import numpy as np
import pytest

from vpeft_viz.analysis import pixel_baseline as PB


def _split(n: int, rng: np.random.Generator, labels: np.ndarray | None = None):
    """3 classes; class k lights channel k of the top-left quadrant, under heavy noise."""
    y = np.arange(n) % 3 if labels is None else labels
    x = rng.normal(120, 40, (n, 8, 8, 3))
    x[np.arange(n), :4, :4, y] += 60
    return np.clip(x, 0, 255).astype(np.uint8), y


def test_learnable_task_beats_chance_and_reports_the_protocol():
    rng = np.random.default_rng(0)
    rec = PB.pixel_baseline(_split(90, rng), _split(30, rng), _split(60, rng), num_classes=3)
    assert rec["test_acc"] > 0.8 and rec["chance"] == pytest.approx(1 / 3)
    assert rec["chance_rule"].startswith("1/num_classes")
    assert set(rec["val_acc_by_C"]) == {f"{c:g}" for c in PB.C_GRID}
    assert rec["val_acc"] == max(rec["val_acc_by_C"].values())
    assert rec["val_acc_by_C"][f"{rec['C']:g}"] == rec["val_acc"]
    assert (rec["n_train"], rec["n_val"], rec["n_test"]) == (90, 30, 60)


def test_labels_unrelated_to_pixels_stay_near_chance():
    rng = np.random.default_rng(1)
    noise = [_split(n, rng) for n in (300, 60, 300)]
    shuffled = [(x, rng.permutation(y)) for x, y in noise]
    rec = PB.pixel_baseline(*shuffled, num_classes=3)
    assert rec["test_acc"] < 0.45


def test_c_is_chosen_on_val_not_test():
    """Another test split changes nothing but the test score; another val split can."""
    rng = np.random.default_rng(2)
    train, val = _split(60, rng), _split(30, rng)
    easy, noise = _split(30, rng), _split(30, rng)
    noise = (noise[0], rng.permutation(noise[1]))
    a = PB.pixel_baseline(train, val, easy, num_classes=3)
    b = PB.pixel_baseline(train, val, noise, num_classes=3)
    assert (a["C"], a["val_acc_by_C"]) == (b["C"], b["val_acc_by_C"])
    assert a["test_acc"] > b["test_acc"]
    c = PB.pixel_baseline(train, noise, easy, num_classes=3)
    assert c["val_acc_by_C"] != a["val_acc_by_C"]


def test_unbalanced_test_split_uses_the_majority_rate():
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    assert PB.chance_level(labels, 3) == (0.6, "majority-class rate (unbalanced test split)")
    assert PB.chance_level(np.array([0, 1, 2, 3]), 4)[0] == 0.25


def test_table_has_what_the_compare_page_shows():
    rng = np.random.default_rng(3)
    rec = {"task": "toy", **PB.pixel_baseline(_split(30, rng), _split(15, rng),
                                              _split(15, rng), num_classes=3, c_grid=(1.0,))}
    table = PB.as_table([rec])
    assert list(table.columns[:3]) == ["task", "test_acc", "chance"]
    assert table.iloc[0]["task"] == "toy" and table.iloc[0]["C"] == 1.0


def test_reference_file_round_trip_and_clear_errors(tmp_path):
    recs = [{"task": "digits", "test_acc": 0.3, "val_acc": 0.25, "chance": 0.1, "C": 1.0,
             "num_classes": 10, "n_inputs": 3072}]
    path = PB.write_reference(tmp_path / PB.REFERENCE_FILE, recs)
    assert PB.read_reference(path) == {"digits": recs[0]}
    assert PB.read_reference(tmp_path / "absent.json") == {}
    bad = tmp_path / "bad.json"
    bad.write_text('{"kind": "something else", "tasks": {}}')
    with pytest.raises(ValueError, match="not a pixel reference"):
        PB.read_reference(bad)
    bad.write_text("{oops")
    with pytest.raises(ValueError, match="python -m vpeft_viz pixels"):
        PB.read_reference(bad)


def test_reference_rows_follow_the_compare_table():
    import pandas as pd

    agg = pd.DataFrame({"task": ["digits", "count"], "task_group": ["natural", "structured"],
                        "method": ["lora", "lora"], "test_acc": [0.5, 0.4]})
    rows = PB.reference_rows(agg, {"digits": {"test_acc": 0.3, "val_acc": 0.2, "chance": 0.1,
                                              "C": 0.01, "num_classes": 10, "n_inputs": 3072}})
    assert list(rows.columns) == list(agg.columns)
    assert rows["task"].tolist() == ["digits"]
    assert rows["method"].tolist() == [PB.REFERENCE_METHOD]
    assert PB.reference_rows(agg, {}).empty


def test_cli_pixels_rejects_unknown_tasks(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "vpeft_viz", "pixels", "nosuch", "--store",
                        str(tmp_path)], capture_output=True, text=True)
    assert r.returncode != 0 and "unknown embedded task 'nosuch'" in r.stderr
    assert not (tmp_path / PB.REFERENCE_FILE).exists()
