"""Command-line contract (docs/cli.md): methods, params, train, runs; one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vpeft_viz.cli import main
from vpeft_viz.methods import method_names


def _last_json(out: str):
    return json.loads(out.strip().splitlines()[-1])


def test_methods_json_lists_registry(capsys):
    assert main(["methods", "--json"]) == 0
    rows = _last_json(capsys.readouterr().out)
    assert [r["name"] for r in rows] == method_names()
    assert all(r["summary"] for r in rows)


def test_params_lora_vit_base_real_command():
    # the exact command of the issue, as a subprocess: counts without downloading anything
    out = subprocess.run(
        [sys.executable, "-m", "vpeft_viz", "params", "--backbone", "vit_base_patch16_224",
         "--method", "lora", "--json"], capture_output=True, text=True, check=True).stdout
    assert _last_json(out) == {"trainable": 294912, "trainable_excl_head": 294912,
                               "total": 86093568}


def test_params_with_head_and_overrides(capsys):
    assert main(["params", "--backbone", "vit_base_patch16_224", "--method", "vpt-deep",
                 "--set", "num_tokens=10", "--num-classes", "100", "--json"]) == 0
    got = _last_json(capsys.readouterr().out)
    assert got["trainable_excl_head"] == 12 * 768 * 10
    assert got["trainable"] == 12 * 768 * 10 + 768 * 100 + 100


@pytest.mark.parametrize("argv, needle", [
    (["params", "--method", "nope", "--json"], "unknown method 'nope'"),
    (["params", "--method", "lora", "--set", "rank=0"], "lora.rank must be in [1, 1024]"),
    (["params", "--method", "lora", "--set", "rnk=4"], "unknown lora setting 'rnk'"),
    (["params", "--backbone", "not_a_model", "--method", "lora"], "unknown timm model"),
    (["train", "--method", "lora", "--data", "/no/such/folder"], "data folder not found"),
])
def test_errors_are_one_line(argv, needle, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err
    assert len(err.splitlines()) == 1


def test_train_then_runs(vtab_task, tmp_path, capsys):
    store = tmp_path / "store"
    argv = ["train", "--method", "lora", "--data", str(vtab_task), "--epochs", "2",
            "--random-init", "--store", str(store), "--json", "--train-set", "batch_size=8"]
    assert main(argv) == 0
    summary = _last_json(capsys.readouterr().out)
    for key in ("run_id", "val_acc", "test_acc", "trainable_params", "train_time_s",
                "weight_bytes", "flops_per_image", "peak_memory_bytes", "images_per_s"):
        assert key in summary, key
    assert 0.0 <= summary["test_acc"] <= 1.0 and summary["epochs_done"] == 2
    run_dir = store / summary["run_id"]
    for name in ("config.json", "status.json", "metrics.jsonl", "summary.json",
                 "weights.safetensors", "artifacts"):
        assert (run_dir / name).exists(), name
    assert main(["runs", "--store", str(store), "--json"]) == 0
    rows = _last_json(capsys.readouterr().out)
    assert [(r["run_id"], r["status"]) for r in rows] == [(summary["run_id"], "done")]


def test_failed_run_is_recorded(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train800.txt").write_text("images/a.png 0\n")
    store = tmp_path / "store"
    assert main(["train", "--method", "linear", "--data", str(bad), "--random-init",
                 "--store", str(store)]) == 1
    assert "missing" in capsys.readouterr().err
    # the folder lacks split files, so no run is created before validation... or, if a run
    # was created, it is marked failed with the error text
    for run_dir in store.glob("*") if store.exists() else []:
        status = json.loads((run_dir / "status.json").read_text())
        assert status["status"] == "failed" and status["error"]


def test_params_data_dependent_methods(capsys):
    assert main(["params", "--backbone", "vit_base_patch16_224", "--method", "sct",
                 "--json"]) == 0
    assert _last_json(capsys.readouterr().out)["trainable_excl_head"] == 111_744
    assert main(["params", "--method", "spt-lora", "--json"]) == 1
    assert "from data" in capsys.readouterr().err


def test_forwarded_commands_take_dash_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["cache-runs", "-h"])
    assert e.value.code == 0 and "--quick" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "-h"])
    assert e.value.code == 0 and "--steps" in capsys.readouterr().out
