"""AppTest of the Inside page: with no runs, on a read-only shipped store of tiny real runs
(every tab, which must never write into the store), on the real shipped ``cached_runs/``, and
the links to it from Compare."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from conftest import write_vtab_task
from streamlit.testing.v1 import AppTest
from test_inside import make_runs

import vpeft_viz.runs as run_stores
from vpeft_viz.runs import RunStore

ROOT = Path(__file__).resolve().parents[1]
PAGE = str(ROOT / "pages" / "12_Inside.py")
TIMEOUT = 300

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> Path:
    """A store like cached_runs/: finished tiny runs (LoRA's from before runs stored their
    test predictions), and a full fine-tuning run whose weights were not shipped."""
    root = tmp_path_factory.mktemp("inside-pages")
    task = write_vtab_task(root / "colours", num_classes=3, sizes=(24, 9, 12))
    store = RunStore(root / "cached")
    make_runs(store, task, methods=("linear", "lora", "vpt-deep", "full"))
    full = store.get("colours-full-s0")
    full.weights_path.unlink()
    (full.path / "artifacts" / "predictions.npz").unlink()
    full.write_summary({**full.summary(), "weights_shipped": False})
    (store.get("colours-lora-s0").path / "artifacts" / "predictions.npz").unlink()
    return root / "cached"


@pytest.fixture
def cached(stores: Path, shipped: Path) -> Path:
    shutil.copytree(shipped, stores / "cached")
    return stores / "cached"


def _files(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*")}


def texts(at: AppTest) -> str:
    return "\n".join(str(e.value) for k in ("markdown", "caption", "info", "warning", "error")
                     for e in getattr(at, k))


def page(**query) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT)
    for k, v in query.items():
        at.query_params[k] = v
    return at.run()


def test_without_runs_says_how_to_get_some(stores):
    at = page()
    assert not at.exception
    assert "No finished runs yet" in texts(at)
    assert "python -m vpeft_viz train --method lora" in texts(at)


def test_examples_on_a_read_only_store(cached, stores):
    before = _files(cached)
    at = page(task="colours", runs=["colours-linear-s0", "colours-lora-s0",
                                    "colours-vpt-deep-s0", "colours-full-s0"])
    assert not at.exception, at.exception
    body = texts(at)
    # the label names the recipe where shipped runs differ (e.g. "full (epochs=10) · s0")
    assert re.search(r"No stored weights[^\n]*\*\*full( \([^)]*\))? · s0\*\*", body), body
    assert "**12** of 12 test images" in body
    captions = [c.value for c in at.caption if c.value.startswith("#")]
    assert len(captions) == 12 and "true " in captions[0] and "lora · s0" in captions[0]
    # a confusion cell named by its classes, counted as Compare counts it
    at = page(task="colours", runs=["colours-lora-s0", "colours-vpt-deep-s0"],
              filter="cell", true="1", pred="1")
    assert not at.exception, at.exception
    assert "(image, run) pairs" in texts(at) and "true **1**, predicted **1**" in texts(at)
    at.radio(key="filter").set_value("A-not-B").run()
    assert not at.exception
    at.radio(key="filter").set_value("all").run()
    [b for b in at.button if b.label == "Attributions"][3].click().run()  # image #3's button
    assert not at.exception, at.exception
    assert "Test image **#3**" in texts(at) and len(at.get("plotly_chart")) == 1
    assert _files(cached) == before  # the shipped store is never written into
    kept = {d.name.rsplit("-", 1)[0]: sorted(f.name for f in d.iterdir())
            for d in (stores / "cache" / "inside" / "runs").iterdir()}  # in the user cache
    assert kept["colours-lora-s0"][-1] == "predictions.npz"  # recomputed: not stored
    assert "predictions.npz" not in kept["colours-vpt-deep-s0"]  # its test phase stored it
    assert all(any(f.startswith("attributions-test3-") for f in v) for v in kept.values())


def test_attributions_and_network_on_a_read_only_store(cached):
    before = _files(cached)
    runs = ["colours-lora-s0", "colours-vpt-deep-s0"]
    at = page(task="colours", runs=runs, tab="Attributions", image="4")
    assert not at.exception, at.exception
    assert "Test image **#4**" in texts(at)
    assert len(at.get("plotly_chart")) == 1 and len(at.dataframe) == 1
    assert list(at.dataframe[0].value["run"]) == ["lora · s0", "vpt-deep · s0"]

    at = page(task="colours", runs=runs, tab="Network")
    assert not at.exception, at.exception
    assert "not measured on these 12 images yet" in texts(at)
    at.button(key="inside-measure").click().run()
    assert not at.exception, at.exception
    assert len(at.get("plotly_chart")) == 2  # CKA curves, embeddings
    at.radio(key="cka-of").set_value("CLS").run()
    at.radio(key="embed").set_value("tsne").run()
    assert not at.exception, at.exception
    at.button(key="inside-probes").click().run()
    assert not at.exception, at.exception
    assert len(at.get("plotly_chart")) == 3
    assert _files(cached) == before


def test_on_the_shipped_cached_runs(stores, monkeypatch):
    monkeypatch.setattr(run_stores, "CACHED_STORE", ROOT / "cached_runs")
    at = page(task="digits", runs=["digits-vpt-deep-s0", "digits-full-s0"], filter="class",
              true="3")
    assert not at.exception, at.exception
    body = texts(at)
    # the label names the recipe where shipped runs differ (e.g. "full (epochs=10) · s0")
    assert re.search(r"No stored weights[^\n]*\*\*full( \([^)]*\))? · s0\*\*", body), body
    captions = [c.value for c in at.caption if c.value.startswith("#")]
    assert captions and all("true 3" in c for c in captions)


def test_compare_links_to_the_runs_and_its_confusion_cells_are_clickable(stores):
    from test_compare import synthetic_store

    synthetic_store(stores / "cached")
    at = AppTest.from_file(str(ROOT / "pages" / "2_Compare.py"), default_timeout=TIMEOUT).run()
    assert not at.exception
    links = [m.value for m in at.markdown if "Inside?" in m.value]
    assert links and "Look inside these runs" in links[0] and "task=" in links[0]
    assert "runs=" in links[0] and "%5B" not in links[0]  # run ids, one parameter each
    from streamlit.proto.PlotlyChart_pb2 import PlotlyChart

    confusion = at.get("plotly_chart")[-1].proto
    assert '"name":"cells"' in confusion.spec.replace(" ", "")  # one marker per cell
    assert list(confusion.selection_mode) == [PlotlyChart.SelectionMode.POINTS]
