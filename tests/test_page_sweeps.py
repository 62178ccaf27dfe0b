"""AppTest of the Sweeps page: an empty store, and a store holding a sweep part-way through
(runs done, one training, one failed; written through the real plan and manifest)."""

from __future__ import annotations

from pathlib import Path

from _sweep_data import write_fake_sweep
from conftest import page_text as text
from streamlit.testing.v1 import AppTest

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "14_Sweeps.py")
TIMEOUT = 180


def test_empty_store_says_how_to_start_a_sweep(stores):
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    assert "No sweeps in this store yet" in text(at)
    assert "python -m vpeft_viz sweep examples/sweep.toml --backend local" in text(at)


def test_sweep_in_progress(stores):
    write_fake_sweep(stores / "user")
    (stores / "user" / ".sweeps" / "broken.json").write_text("{not json")
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    assert at.selectbox(key="sweep").options == ["grid"]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["done"] == "4" and metrics["running"] == "1"
    assert metrics["failed or cancelled"] == "1"
    body = text(at)
    assert "A sweep manifest could not be read" in body and "broken.json" in body
    assert "Backend **ray** at `auto`" in body
    charts = at.get("plotly_chart")
    specs = [c.proto.spec for c in charts]
    assert len(charts) == 3 and "parcoords" in specs[1]
    assert '"rank"' in specs[1] and "validation acc. (%)" in specs[1]
    tables = [d.value for d in at.dataframe]
    running = next(t for t in tables if "phase" in t.columns)
    assert list(running["step"]) == ["5/13"]
    best = next(t for t in tables if "complete" in t.columns).set_index("method")
    assert best.loc["lora", "setting"] == "rank=4"  # best on validation, not on test
    assert round(best.loc["lora", "test_acc"], 1) == 51.0
    assert not best.loc["lora", "complete"]
    failed = next(e for e in at.expander if "failed or cancelled" in e.label)
    assert "RuntimeError: boom" in str(failed.dataframe[0].value["error"].tolist())
