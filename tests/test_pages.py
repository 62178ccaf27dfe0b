"""AppTest smoke tests of the home, Compare and Methods pages, on an empty store and on a
store of synthetic runs (the shipped cached_runs/ and the user store are pointed at tmp)."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest
from test_compare import synthetic_store, write_run

import vpeft_viz.runs as run_stores
from vpeft_viz.methods import method_names

APP = str(Path(__file__).resolve().parents[1] / "app.py")
TIMEOUT = 180  # the first run imports torch and timm; CI machines can be slow


@pytest.fixture
def empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VPEFT_VIZ_RUNS", str(tmp_path / "user"))
    monkeypatch.setattr(run_stores, "CACHED_STORE", tmp_path / "cached")
    return tmp_path


@pytest.fixture
def synthetic(empty: Path) -> Path:
    synthetic_store(empty / "cached")
    user = run_stores.RunStore(empty / "user")
    write_run(user, method="ssf", task="digits", seed=0, test_acc=0.75, trainable=12_000)
    write_run(user, method="lora", task="digits", seed=5, test_acc=0.1, status="failed")
    return empty


def page(name: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    if name:
        at.switch_page(f"pages/{name}")
    return at.run()


def texts(at: AppTest) -> str:
    parts = [e.value for kind in ("markdown", "caption", "info", "warning", "title",
                                  "subheader") for e in getattr(at, kind)]
    return "\n".join(str(p) for p in parts)


def test_home_empty(empty: Path) -> None:
    at = page()
    assert not at.exception
    assert "visual parameter-efficient fine-tuning" in at.title[0].value
    body = texts(at)
    assert "shipped cached_runs/:** 0 runs" in body and "your runs:** 0 runs" in body
    assert "cache-runs" in body
    assert "vit_tiny_patch4_32_vpeft" in body
    assert "GPU" in body
    links = [link.proto.page for link in at.get("page_link")
             if not link.proto.label.startswith("Start here")]
    assert {"Compare", "Methods"} <= set(links)
    assert len(links) == len(list((Path(APP).parent / "pages").glob("[!_]*.py")))


def test_home_counts_runs(synthetic: Path) -> None:
    body = texts(page())
    assert "shipped cached_runs/:** 20 runs (20 done)" in body
    assert "your runs:** 2 runs (1 done, 1 failed)" in body


def test_compare_empty(empty: Path) -> None:
    at = page("2_Compare.py")
    assert not at.exception
    assert "Selected on validation; test reported once" in at.info[0].value
    assert "No finished runs yet" in at.info[1].value


def test_compare_with_runs(synthetic: Path) -> None:
    at = page("2_Compare.py")
    assert not at.exception
    assert "Selected on validation; test reported once" in at.info[0].value
    assert len(at.dataframe) == 2  # per task, averaged over tasks
    table = at.dataframe[0].value
    assert len(table) == 9  # 4 methods × 2 tasks (cached) + ssf (user)
    lora = table[(table["Task"] == "digits") & (table["Method"] == "lora")].iloc[0]
    assert lora["Seeds"] == 3 and lora["Test acc"] == pytest.approx(80.0)
    # readable on a projector: method and accuracy first, "–" (not None) where a value is
    # missing (one seed: no spread), no column equal on every row
    assert list(table.columns[:2]) == ["Method", "Test acc"]
    assert table.loc[table["Method"] == "ssf", "Test ±"].tolist() == ["–"]
    assert not table.isna().any().any() and "None" not in table.astype(str).to_string()
    assert "Backbone" not in table.columns and "Backbone" in texts(at)  # said once, above
    means = at.dataframe[1].value
    assert set(means["plain mean is"]) == {"plain mean over 2 tasks", "plain mean over 1 task"}
    assert "differe" in texts(at)  # task sets differ: ssf was run on one task only
    charts = at.get("plotly_chart")
    assert len(charts) == 6  # 3 Pareto, curves, per-class, confusion
    assert len(at.get("download_button")) == 2
    assert "On the frontier" in texts(at)


def test_compare_filters_and_detail_widgets(synthetic: Path) -> None:
    at = page("2_Compare.py")
    at.multiselect(key="compare-filter-method").set_value(["lora", "full"]).run()
    assert not at.exception
    assert set(at.dataframe[0].value["Method"]) == {"lora", "full"}
    at.multiselect(key="compare-filter-source").set_value(["user"]).run()
    assert not at.exception
    assert "No run matches" in at.warning[0].value
    at.multiselect(key="compare-filter-source").set_value(["cached", "user"]).run()
    at.selectbox(key="task").set_value("count")
    at.radio(key="acc").set_value("val_acc")
    at.selectbox(key="detail-metric").set_value("train_loss").run()
    assert not at.exception
    assert at.selectbox(key="task").value == "count"


def test_methods_hub_lists_every_method(empty: Path) -> None:
    at = page("3_Methods.py")
    assert not at.exception
    body = texts(at)
    for name in method_names():
        assert f"`{name}`" in body
    assert "No dedicated view yet" in body or "view is not built yet" in body
    assert "The tour needs cached runs" in body


def test_methods_guided_tour_walks_to_the_end(synthetic: Path) -> None:
    at = page("3_Methods.py")
    assert not at.exception
    seen = []
    for _ in range(10):
        seen.append(at.subheader[0].value)
        nxt = at.button(key="tour-next")
        if nxt.disabled:
            break
        nxt.click().run()
        assert not at.exception
    assert seen[0] == "One task, three ways to adapt" and seen[-1] == "One number: PPT"
    assert "Compare" in [link.proto.page for link in at.get("page_link")]
    assert "Task **digits**" not in texts(at)  # last step, not the first
    at.button(key="tour-back").click().run()
    assert at.subheader[0].value == "Seeds matter"
    assert at.dataframe  # the per-seed table


def test_home_starts_here_with_a_link_to_the_tour_step(empty: Path) -> None:
    at = page()
    (start,) = [link.proto for link in at.get("page_link")
                if link.proto.label.startswith("Start here")]
    assert start.page == "Methods" and start.query_string == "tab=Guided+tour&step=1"


def test_tour_step_comes_from_the_url(synthetic: Path) -> None:
    first = page("3_Methods.py").subheader[0].value
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.switch_page("pages/3_Methods.py")
    at.query_params["step"] = "3"
    at.run()
    assert not at.exception
    assert at.subheader[0].value != first
    assert "Step 3 of" in at.get("progress")[0].proto.text
    at.button(key="tour-next").click().run()
    assert at.query_params["step"] == "4"


def test_compare_shows_the_pixel_reference(synthetic: Path) -> None:
    """A store's pixel_baseline.json becomes a reference row per task and a dashed line."""
    from vpeft_viz.analysis.pixel_baseline import REFERENCE_METHOD, write_reference

    write_reference(synthetic / "cached" / run_stores.PIXEL_REFERENCE_FILE, [
        {"task": "digits", "test_acc": 0.42, "val_acc": 0.40, "chance": 0.104, "C": 0.01,
         "num_classes": 10, "n_inputs": 3072}])
    at = page("2_Compare.py")
    assert not at.exception
    table = at.dataframe[0].value
    row = table[table["Method"] == REFERENCE_METHOD]
    assert len(row) == 1 and row.iloc[0]["Test acc"] == pytest.approx(42.0)
    assert row.iloc[0]["Task"] == "digits"  # only tasks with a reference get a row
    at.selectbox(key="task").set_value("digits").run()
    assert "Dashed line: pixels, no backbone" in texts(at)
    at.toggle(key="pixels").set_value(False).run()
    assert REFERENCE_METHOD not in set(at.dataframe[0].value["Method"])


def test_compare_says_when_the_pixel_reference_is_unreadable(synthetic: Path) -> None:
    (synthetic / "cached" / run_stores.PIXEL_REFERENCE_FILE).write_text("{not json")
    at = page("2_Compare.py")
    assert not at.exception
    assert any("python -m vpeft_viz pixels" in w.value for w in at.warning)
