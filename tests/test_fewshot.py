"""Few-shot training splits (vpeft_viz/data/fewshot.py, the ``shots`` training setting):
exactly k images per class, seeded and nested, validation and test untouched, a clear error
for a class with fewer than k, and the whole path from the command line into a run."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from vpeft_viz.cli import main
from vpeft_viz.config import ConfigError
from vpeft_viz.data import DataError, resolve_data
from vpeft_viz.data.fewshot import apply_shots, few_shot_samples
from vpeft_viz.data.formats import Sample
from vpeft_viz.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def samples(per_class: dict[int, int]) -> list[Sample]:
    out = []
    for label, n in per_class.items():
        out += [Sample(Path(f"/x/{label}_{i}.png"), label) for i in range(n)]
    return sorted(out, key=lambda s: s.path.name[::-1])  # classes interleaved, as in a split


@pytest.mark.parametrize("k", [1, 2, 4, 8, 16])
def test_exactly_k_per_class_in_the_splits_order(k):
    pool = samples({0: 80, 1: 40, 2: 16})
    got = few_shot_samples(pool, 3, k, seed=0)
    assert Counter(s.label for s in got) == {0: k, 1: k, 2: k}
    assert len(set(got)) == 3 * k
    positions = [pool.index(s) for s in got]
    assert positions == sorted(positions)


def test_seeded_nested_and_different_per_seed():
    pool = samples({0: 80, 1: 80, 2: 80})
    assert few_shot_samples(pool, 3, 4, seed=7) == few_shot_samples(pool, 3, 4, seed=7)
    assert few_shot_samples(pool, 3, 4, seed=7) != few_shot_samples(pool, 3, 4, seed=8)
    for small, big in zip((1, 2, 4, 8), (2, 4, 8, 16)):
        assert set(few_shot_samples(pool, 3, small, 3)) <= set(few_shot_samples(pool, 3, big, 3))
    # a class's draw does not depend on the other classes
    alone = few_shot_samples([s for s in pool if s.label != 2] + samples({2: 1}), 3, 1, 3)
    assert [s for s in alone if s.label < 2] == [
        s for s in few_shot_samples(pool, 3, 1, 3) if s.label < 2]


def test_a_class_with_fewer_than_k_images_is_named():
    pool = samples({0: 10, 1: 3, 2: 10})
    with pytest.raises(DataError, match=r"train.shots=4 .*\(class 1: 3\).*at most 3"):
        few_shot_samples(pool, 3, 4, seed=0)
    with pytest.raises(DataError, match=r"class 3 \(d\): 0"):  # a class absent from the split
        few_shot_samples(pool, 4, 2, seed=0, class_names=["a", "b", "c", "d"])


def test_apply_shots_leaves_val_and_test_alone(vtab_task):
    task = resolve_data(str(vtab_task))
    few = apply_shots(task, 2, seed=1)
    assert few.splits["val"] is task.splits["val"] and few.splits["test"] is task.splits["test"]
    assert Counter(s.label for s in few.splits["train"]) == {0: 2, 1: 2, 2: 2}
    assert set(few.splits["train"]) <= set(task.splits["train"])
    assert len(task.splits["train"]) == 24  # the original task is unchanged
    assert "2 training image(s) per class" in few.notes[-1]
    assert apply_shots(task, None, seed=1) is task


def test_train_config_records_shots_and_the_split_seed():
    assert TrainConfig.from_dict({"shots": 0}).shots is None  # 0 and empty: the whole split
    cfg = TrainConfig.from_dict({"shots": 4, "seed": 3})
    assert cfg.split_seed == 3 and cfg.to_dict()["shots"] == 4
    assert TrainConfig.from_dict({"shots": 4, "seed": 3, "shots_seed": 9}).split_seed == 9
    with pytest.raises(ConfigError, match="train.shots must be in"):
        TrainConfig.from_dict({"shots": -1})


def test_cli_trains_on_k_shots_and_refuses_too_many(vtab_task, tmp_path, capsys):
    store = tmp_path / "store"
    argv = ["train", "--method", "linear", "--data", str(vtab_task), "--epochs", "1",
            "--random-init", "--store", str(store), "--json", "--train-set", "shots=2",
            "--train-set", "batch_size=4", "--seed", "5"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["train_size"] == 6 and summary["shots"] == 2
    assert summary["shots_seed"] == 5 and summary["train_size_full"] == 24
    config = json.loads((store / summary["run_id"] / "config.json").read_text())
    assert config["train"]["shots"] == 2 and config["train"]["shots_seed"] is None

    assert main([*argv[:-6], "--train-set", "shots=9"]) == 1  # 8 images per class
    err = capsys.readouterr().err
    assert "train.shots=9" in err and "at most 8" in err
    assert len(list(store.iterdir())) == 1  # refused before a run directory was made


def test_compare_groups_old_and_new_full_runs_and_names_the_shots():
    from vpeft_viz.analysis.compare import _setting, setting_labels

    base = {"method": "lora", "method_config": {"rank": 8},
            "backbone": {"name": "b", "pretrained": True, "checkpoint": None},
            "data": {"spec": "embedded:count", "name": "count", "normalization": "backbone"},
            "train": {"epochs": 10, "lr": None, "seed": 0}}
    old = _setting(base, "cpu")  # recorded before train.shots existed
    new = _setting({**base, "train": {**base["train"], "shots": None, "shots_seed": None}},
                   "cpu")
    few = _setting({**base, "train": {**base["train"], "seed": 2, "shots": 4,
                                      "shots_seed": 7}}, "cpu")
    keys = [json.dumps(s, sort_keys=True) for s in (old, new, few)]
    assert keys[0] == keys[1] and keys[2] != keys[0]
    labels = setting_labels(keys)
    assert labels[keys[0]] == "" and labels[keys[2]] == "shots=4"
