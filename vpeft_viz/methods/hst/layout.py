"""How HST's side network is laid out on a backbone: stages, widths, grids, the stem.

The release builds one layout, for ViT-B/16 at 224 px: 4 stages (widths 32/48/64/72, heads
2/4/8/12), each fed by 3 consecutive ViT layers (one side block per layer), on grids of
56, 28, 14 and 7 — 4×, 2×, 1× and ½× the ViT's 14×14 patch grid. :func:`side_layout` derives
the same structure from any backbone's depth, grid and image size (docs/methods.md, "HST"):

* **stages** S: the largest divisor of the depth not above 4 (ViT-B: 4; the embedded 6-block
  ViT: 3; a 2-block ViT: 2), so every stage gets the same number of ViT layers and each
  layer its own side block, as in the release; ``stages`` forces another divisor;
* **grids**: the last stage sits at ½× the ViT grid and each earlier stage doubles it, so S
  stages are the release's last S (ViT-B: 56/28/14/7; embedded 8×8 grid: 16/8/4); the stem
  gets there with a stride of ``patch / 2^(S−2)`` (release: 16/4 = 4);
* **widths and heads** go with the grids: the release's last S (embedded: 48/64/72 wide,
  4/8/12 heads), so the head always reads 72 features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RELEASE_WIDTHS = (32, 48, 64, 72)
RELEASE_HEADS = (2, 4, 8, 12)
MAX_STAGES = len(RELEASE_WIDTHS)


@dataclass(frozen=True)
class Stage:
    """One side stage: the ViT layers feeding its blocks (one block per layer), its width,
    attention heads and token grid (rows, columns)."""

    layers: tuple[int, ...]
    width: int
    heads: int
    grid: tuple[int, int]


@dataclass(frozen=True)
class SideLayout:
    """The side network on one backbone; ``stem_stride`` is the first convolution's stride
    and ``stem_kernel`` the second's kernel (= stride), per axis."""

    stages: tuple[Stage, ...]
    stem_stride: tuple[int, int]
    stem_kernel: tuple[int, int]
    vit_grid: tuple[int, int]
    image: tuple[int, int]

    @property
    def out_features(self) -> int:
        return self.stages[-1].width

    @property
    def depth(self) -> int:
        return sum(len(s.layers) for s in self.stages)


def default_stages(depth: int) -> int:
    """The largest divisor of ``depth`` not above :data:`MAX_STAGES`."""
    return max(d for d in range(1, MAX_STAGES + 1) if depth % d == 0)


def _conv_out(n: int, kernel: int, stride: int, pad: int) -> int:
    return (n + 2 * pad - kernel) // stride + 1


def side_layout(*, depth: int, vit_grid: tuple[int, int], image: tuple[int, int],
                stages: int = 0) -> SideLayout:
    """The side network for a ViT of ``depth`` blocks whose ``image`` (rows, columns) is cut
    into a ``vit_grid`` of patches; ``stages`` 0 picks :func:`default_stages`."""
    if depth < 1:
        raise ValueError(f"HST needs at least one ViT block, got depth {depth}")
    n = stages or default_stages(depth)
    if n > MAX_STAGES or depth % n:
        ok = [d for d in range(1, MAX_STAGES + 1) if depth % d == 0]
        raise ValueError(f"hst.stages={n} does not split the backbone's {depth} blocks into "
                         f"equal stages of at most {MAX_STAGES}; use 0 (automatic) or one of "
                         f"{', '.join(map(str, ok))}")
    per = depth // n
    strides, kernels = [], []
    for img, g in zip(image, vit_grid):
        stride = max(1, round(img / g / 2.0 ** (n - 2)))  # patch / 2^(S−2): release 16/4 = 4
        first = 2 if stride >= 2 else 1
        strides.append(first)
        kernels.append(max(1, round(stride / first)))
    grid = tuple(_conv_out(_conv_out(img, 3, s, 1), k, k, 0)
                 for img, s, k in zip(image, strides, kernels))
    if min(grid) < 1:
        raise ValueError(f"HST's stem leaves no grid on {image[0]}×{image[1]} images")
    out = []
    for i in range(n):
        if i:
            grid = tuple(_conv_out(g, 3, 2, 1) for g in grid)
        j = MAX_STAGES - n + i
        out.append(Stage(layers=tuple(range(i * per, (i + 1) * per)),
                         width=RELEASE_WIDTHS[j], heads=RELEASE_HEADS[j],
                         grid=(int(grid[0]), int(grid[1]))))
    return SideLayout(stages=tuple(out), stem_stride=(strides[0], strides[1]),
                      stem_kernel=(kernels[0], kernels[1]),
                      vit_grid=(int(vit_grid[0]), int(vit_grid[1])),
                      image=(int(image[0]), int(image[1])))


def grid_ratio(stage: Stage, layout: SideLayout) -> float:
    """The stage's grid over the ViT's (rows): 4, 2, 1, ½ on ViT-B."""
    return stage.grid[0] / layout.vit_grid[0] if layout.vit_grid[0] else math.nan
