"""What the lab derives from the method registry, checked for every registered method.

A method declares its view page, its shipped cached runs and its ViT-B count on its class;
the methods hub, the home page, the cached-runs recipe and the count tests are derived from
those declarations. These tests are parametrised over the registry, so a new method with a
page is covered with no new test code: its page must exist, open without runs, say how to
get one, and be linked from the hub.
"""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from vpeft_viz.methods import get_method_class, method_names, methods_with_view, view_pages
from vpeft_viz.runs import cached
from vpeft_viz.ui.common import PAGES_DIR, page_blurb, page_files, page_title
from vpeft_viz.weights import EMBEDDED_BACKBONE

TIMEOUT = 180
VIEW_PAGES = sorted(set(view_pages().values()))


def test_view_pages_exist_and_list_their_methods():
    assert VIEW_PAGES, "no method declares a view page"
    for name, page in view_pages().items():
        assert (PAGES_DIR / page).is_file(), f"{name} declares view_page {page!r}, not in pages/"
        assert name in methods_with_view(page)
    assert set(view_pages()) <= set(method_names())


@pytest.mark.parametrize("page", VIEW_PAGES)
def test_view_page_without_runs_says_how_to_get_one(page, stores):
    at = AppTest.from_file(str(PAGES_DIR / page), default_timeout=TIMEOUT).run()
    assert not at.exception
    body = "\n".join(str(e.value) for k in ("markdown", "caption", "info", "warning")
                     for e in getattr(at, k))
    assert f"No finished {page_title(PAGES_DIR / page)} runs yet" in body
    offered = body + "".join(str(s.options) for s in at.selectbox)
    for method in methods_with_view(page):
        assert method in offered, f"{page} offers no way to start a {method} run"
    assert f"python -m vpeft_viz train --method {methods_with_view(page)[0]}" in body


def test_every_page_describes_itself_for_the_home_page():
    for path in page_files():
        blurb = page_blurb(path)
        assert blurb and not blurb.startswith(page_title(path)), path.name


def test_cached_recipe_is_derived_from_each_methods_seeds():
    recipe = cached.default_recipe()
    shipped = {m for m, *_ in recipe}
    for name in method_names():
        seeds = get_method_class(name).cached_seeds
        assert (name in shipped) == bool(seeds)
        for method, _task, got, epochs in recipe:
            if method == name:
                assert tuple(got) == tuple(seeds) and epochs == cached.EPOCHS
    # every method with a view is shipped, so its page opens on real runs
    assert set(view_pages()) <= shipped
    assert {t for _, t, *_ in recipe} == set(cached.TASKS)


def test_learning_rate_help_is_derived_from_the_methods():
    from dataclasses import fields

    from vpeft_viz.train import TrainConfig

    (lr,) = [f for f in fields(TrainConfig) if f.name == "lr"]
    embedded, other = lr.metadata["help"].split("on other backbones")
    for name in method_names():
        assert f"{get_method_class(name).default_lr:g}" in other
        assert f"{get_method_class(name).default_lr_on(EMBEDDED_BACKBONE):g}" in embedded


def test_default_learning_rate_belongs_to_the_backbone():
    """The embedded backbone's live recipe has its own rates (chosen on its validation
    splits); a run on any other backbone uses the method's own default."""
    from vpeft_viz.runs.execute import make_run_config
    from vpeft_viz.weights import EMBEDDED_LR

    assert set(EMBEDDED_LR) <= set(method_names())
    for name in method_names():
        cls = get_method_class(name)
        assert cls.default_lr_on(EMBEDDED_BACKBONE) == EMBEDDED_LR.get(name, cls.default_lr)
        assert cls.default_lr_on(None) == cls.default_lr_on(EMBEDDED_BACKBONE)
        assert cls.default_lr_on("vit_base_patch16_224") == cls.default_lr
    cfg = make_run_config(method="lora", data="embedded:count", pretrained=False)
    assert cfg["train"]["lr"] == EMBEDDED_LR["lora"]
    cfg = make_run_config(method="lora", data="embedded:count", pretrained=False,
                          backbone="vit_tiny_patch16_224")
    assert cfg["train"]["lr"] == get_method_class("lora").default_lr
    given = make_run_config(method="lora", data="embedded:count", train={"lr": 0.05})
    assert given["train"]["lr"] == 0.05


def test_cached_variants_are_valid_settings_with_their_own_run_ids():
    from vpeft_viz.methods import create_method

    specs = cached.planned_runs()
    ids = [s["run_id"] for s in specs]
    assert len(ids) == len(set(ids))
    for spec in cached.variant_specs():
        create_method(spec["method"], spec["settings"])  # raises on an unknown or bad value
        assert spec["task"] in cached.TASKS and spec["run_id"] in ids


def test_pages_are_ordered_by_number_prefix():
    """``10_X.py`` comes after ``9_Y.py`` in the navigation (not in string order)."""
    numbers = [int(p.name.split("_", 1)[0]) for p in page_files()]
    assert numbers == sorted(numbers)
