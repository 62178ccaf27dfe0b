"""The package's layering (docs/architecture.md): imports point down only.

Every ``import``/``from`` in ``vpeft_viz/`` — at module level or inside a function — is
checked against the layer table; a module may import from its own layer or a lower one.
Pages and the home page stay UI only: they may use any layer, but never torch or timm
directly (computations belong in the library), and only ``vpeft_viz.ui`` (with the pages)
imports streamlit.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vpeft_viz"

# Top to bottom. The first component of a module's path inside vpeft_viz names its unit.
LAYERS: list[set[str]] = [
    {"__main__", "cli"},  # entry points
    {"ui"},  # the only library code importing streamlit
    {"plots"},  # plotly figure builders
    {"analysis"},  # computations behind the views, on runs and records
    {"runs"},  # run store, execution, queue, workers, cached runs
    {"train", "pretrain"},  # training engine; the embedded backbone's pretraining recipe
    {"methods"},  # one file or package per method, registry, shared layers
    {"probes"},  # model-on-data measurements used by methods and views
    {"data", "backbones"},  # task formats and the embedded suite; timm models
    {"weights"},  # the shipped embedded weights: files, model card, their identity (no torch)
    {"config", "__init__"},  # validated config dataclasses; the package itself
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def unit_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def imported_units(path: Path) -> list[tuple[int, str]]:
    """(line, unit of vpeft_viz) for every internal import of a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = path.relative_to(ROOT).with_suffix("").parts[:-1]  # package of the module
    if path.name == "__init__.py":
        pkg = path.relative_to(ROOT).parts[:-1]
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - node.level + 1]
                mod = ".".join([*base, *([node.module] if node.module else [])])
                names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        for name in names:
            parts = name.split(".")
            if parts[0] == "vpeft_viz" and len(parts) > 1:
                out.append((node.lineno, parts[1]))
    return out


def test_every_unit_has_a_layer():
    units = {unit_of(p) for p in PACKAGE.rglob("*.py")}
    assert not units - set(RANK), f"add {sorted(units - set(RANK))} to LAYERS (and the docs)"


def test_imports_point_down():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = unit_of(path)
        for line, there in imported_units(path):
            if there in RANK and RANK[there] < RANK[here]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({here}) imports {there}")
    assert not wrong, "imports pointing up:\n" + "\n".join(wrong)


def test_the_checker_sees_relative_and_lazy_imports(tmp_path):
    (tmp_path / "vpeft_viz" / "methods").mkdir(parents=True)
    mod = tmp_path / "vpeft_viz" / "methods" / "x.py"
    mod.write_text("from ..runs import store\n\ndef f():\n    from vpeft_viz.ui import common\n")
    global ROOT
    saved = ROOT
    try:
        ROOT = tmp_path
        assert [u for _, u in imported_units(mod)] == ["runs", "ui"]
    finally:
        ROOT = saved


def test_pages_are_ui_only():
    offenders = []
    for path in [ROOT / "app.py", *sorted((ROOT / "pages").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {m}" for m in mods
                          if m.split(".")[0] in {"torch", "timm"}]
    assert not offenders, offenders


def test_only_ui_imports_streamlit():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if unit_of(path) == "ui":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [str(path.relative_to(ROOT)) for m in mods
                          if m.split(".")[0] == "streamlit"]
    assert not offenders, offenders


def test_no_module_is_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600}
    assert not long, f"split these into packages: {long}"
