"""Raw-pixel reference per embedded task: logistic regression on standardised pixels.

For every task of the default suite: scikit-learn ``LogisticRegression`` on the standardised
32×32×3 pixels of train800, ``C`` chosen on val200 from ``C_GRID``, test scored once
(``vpeft_viz/analysis/pixel_baseline.py``). Writes ``benchmarks/results/pixel_baseline.json``
(machine and versions) and prints a Markdown table.

    python benchmarks/pixel_baseline.py [--tasks mnist digits ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import write_result  # noqa: E402

from vpeft_viz.analysis.pixel_baseline import (  # noqa: E402
    PROTOCOL,
    task_pixel_baseline,
)


def main() -> None:
    import numpy as np
    import sklearn

    from vpeft_viz.data.embedded import EMBEDDED_TASKS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="*", default=list(EMBEDDED_TASKS))
    args = p.parse_args()
    records = []
    for task in args.tasks:
        records.append(task_pixel_baseline(task))
        r = records[-1]
        print(f"{task:<14} test {r['test_acc']:.3f}  val {r['val_acc']:.3f}  C {r['C']:g}  "
              f"chance {r['chance']:.3f}  ({r['seconds']} s)", file=sys.stderr, flush=True)
    mean = float(np.mean([r["test_acc"] for r in records]))
    path = write_result("pixel_baseline", {
        "protocol": PROTOCOL,
        "versions": {"scikit-learn": sklearn.__version__, "numpy": np.__version__},
        "tasks": records, "mean_test_acc": mean})
    print("| task | pixels (test) | chance | C |\n|---|---:|---:|---:|")
    for r in records:
        print(f"| {r['task']} | {r['test_acc']:.3f} | {r['chance']:.3f} | {r['C']:g} |")
    print(f"| **mean** | **{mean:.3f}** | | |\nwrote {path}")


if __name__ == "__main__":
    main()
