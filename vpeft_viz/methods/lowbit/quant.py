"""The low-bit quantiser and its packed storage.

A weight matrix ``w`` is standardised by its own scalar mean μ and unbiased std σ,
``z = (w − μ) / (σ + 1e-5)``, snapped to a fixed codebook for N(0, 1) and de-standardised,
``w_q = c[idx(z)] · σ + μ`` (Jie et al., ICCV 2023). The snap has an identity
straight-through backward (no clipping); μ and σ stay in the graph, so the gradient reaching
``w`` is ``δ_ij + (c_i − z_i) ∂σ/∂w_j``.

The codebook comes from a Lloyd-style iteration for the standard normal with medians instead
of means: thresholds at the midpoints of adjacent codes, each code the normal quantile of its
cell's probability midpoint (the median of its cell), 500 iterations from all-zero codes.
It is computed here, not typed in (1 bit gives ±Φ⁻¹(0.75) = ±0.6745).

Storage: a matrix at ``b`` < 32 bits is kept as its code indices, ``b`` bits each, packed
into bytes (little-endian within a byte), plus μ and σ as float32 — ``ceil(n·b/8) + 8``
bytes. At 32 bits the matrix is plain float32. :func:`pack_matrices` writes several such
matrices behind a small header; :func:`unpack_matrices` reads them back.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

BITS = (1, 2, 4, 8, 32)
EPS = 1e-5
ITERATIONS = 500


@cache
def _codebook64(bits: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if bits not in BITS or bits == 32:
        raise ValueError(f"a codebook exists for 1, 2, 4 or 8 bits, not {bits}")
    n = 2 ** bits
    # All codes start at 0 and 500 iterations follow (the paper's recipe). That is converged
    # up to 4 bits; at 8 bits the tails are still spreading (the largest code is 2.8095,
    # the fixed point's ≈ 3.46), and the codebook *is* the 500-iteration one.
    codes = torch.zeros(n, dtype=torch.float64)
    for _ in range(ITERATIONS):
        thresholds = (codes[1:] + codes[:-1]) / 2
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.special.ndtr(thresholds),
                         torch.ones(1, dtype=torch.float64)])
        codes = torch.special.ndtri((cdf[1:] + cdf[:-1]) / 2)
    thresholds = (codes[1:] + codes[:-1]) / 2
    return tuple(codes.tolist()), tuple(thresholds.tolist())


def codebook(bits: int) -> torch.Tensor:
    """The 2**bits codes for N(0, 1), ascending (float32)."""
    return torch.tensor(_codebook64(bits)[0], dtype=torch.float32)


def thresholds(bits: int) -> torch.Tensor:
    """The 2**bits − 1 cell boundaries (midpoints of adjacent codes), ascending (float32)."""
    return torch.tensor(_codebook64(bits)[1], dtype=torch.float32)


class _Snap(torch.autograd.Function):
    """Forward: the code of each entry's cell; backward: the identity (straight through)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, codes: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
        return codes[torch.bucketize(z, bounds)]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


def stats(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """μ and the unbiased σ of a whole matrix (scalars, differentiable)."""
    return w.mean(), w.std()


def code_indices(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Each entry's code index (int64, same shape) under ``w``'s own μ and σ."""
    mu, sigma = stats(w.detach())
    return torch.bucketize((w.detach() - mu) / (sigma + EPS), thresholds(bits).to(w.device))


def dequantise(idx: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor,
               bits: int) -> torch.Tensor:
    """``c[idx] · σ + μ``: the same float32 operations as the training forward, so a matrix
    read back from its codes equals the one the trained model used, bit for bit."""
    return codebook(bits).to(idx.device)[idx] * sigma + mu


def quantise(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The quantised matrix, differentiable (straight-through snap, μ and σ in the graph)."""
    if bits == 32:
        return w
    mu, sigma = stats(w)
    z = (w - mu) / (sigma + EPS)
    q = _Snap.apply(z, codebook(bits).to(w.device), thresholds(bits).to(w.device))
    return q * sigma + mu


class QLinear(nn.Module):
    """A bias-free linear layer whose weight is quantised to ``bits`` in every forward.

    After :meth:`load_codes` the layer holds the de-quantised matrix itself and stops
    quantising (``frozen``): that is the model a packed run file describes, and its weight
    is the space a flatness analysis perturbs.
    """

    def __init__(self, in_features: int, out_features: int, bits: int):
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {bits}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # nn.Linear's default
        self.frozen = False

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bits={self.bits}, frozen={self.frozen}"

    def effective_weight(self) -> torch.Tensor:
        return self.weight if self.frozen else quantise(self.weight, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight())

    def load_codes(self, idx: torch.Tensor, mu: float, sigma: float) -> None:
        """Hold ``c[idx]·σ + μ`` as the weight and stop quantising."""
        with torch.no_grad():
            dev = self.weight.device
            w = dequantise(idx.to(dev).view_as(self.weight),
                           torch.tensor(mu, dtype=torch.float32, device=dev),
                           torch.tensor(sigma, dtype=torch.float32, device=dev), self.bits)
            self.weight.copy_(w)
        self.frozen = True


# -- packed storage -------------------------------------------------------------------------
MAGIC = b"VPQB"
VERSION = 1
_HEAD = struct.Struct("<4sBBHI")  # magic, version, bits, matrices, crc32 of the names
_MATRIX = struct.Struct("<IIff")  # rows, cols, μ, σ


def payload_bytes(numel: int, bits: int) -> int:
    """Bytes one matrix takes: packed codes plus μ and σ (float32 entries at 32 bits)."""
    return 4 * numel if bits == 32 else -(-numel * bits // 8) + 8


def header_bytes(matrices: int) -> int:
    """The header of a packed file: format, bit width, a check of the names, the shapes."""
    return _HEAD.size + matrices * (_MATRIX.size - 8)


def pack_codes(idx: np.ndarray, bits: int) -> bytes:
    """Indices in [0, 2**bits) packed ``8 // bits`` to a byte, the first in the low bits."""
    idx = np.asarray(idx, dtype=np.uint8).ravel()
    per = 8 // bits
    if idx.size and int(idx.max()) >= 2 ** bits:
        raise ValueError(f"code index {int(idx.max())} does not fit in {bits} bits")
    padded = np.zeros(-(-idx.size // per) * per, dtype=np.uint8)
    padded[:idx.size] = idx
    groups = padded.reshape(-1, per)
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(groups << shifts, axis=1).astype(np.uint8).tobytes()


def unpack_codes(data: bytes, numel: int, bits: int) -> np.ndarray:
    per = 8 // bits
    raw = np.frombuffer(data, dtype=np.uint8)
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    out = (raw[:, None] >> shifts) & np.uint8(2 ** bits - 1)
    return out.ravel()[:numel]


@dataclass
class PackedMatrix:
    """One matrix as stored: codes (or float32 values at 32 bits), μ, σ."""

    rows: int
    cols: int
    mu: float
    sigma: float
    data: np.ndarray  # int64 code indices, or float32 values at 32 bits


def names_check(names: list[str]) -> int:
    return zlib.crc32("\n".join(names).encode())


def pack_matrices(layers: list[tuple[str, QLinear]]) -> bytes:
    """The packed file for ``layers`` (all of one bit width), in the given order."""
    if not layers:
        raise ValueError("nothing to pack")
    bits = {layer.bits for _, layer in layers}
    if len(bits) != 1:
        raise ValueError(f"layers mix bit widths {sorted(bits)}")
    (b,) = bits
    head = [_HEAD.pack(MAGIC, VERSION, b, len(layers), names_check([n for n, _ in layers]))]
    body = []
    for _, layer in layers:
        w = layer.weight.detach().float().cpu()
        if b == 32:
            head.append(struct.pack("<II", *w.shape))
            body.append(w.numpy().astype("<f4").tobytes())
            continue
        if layer.frozen:
            raise ValueError("a frozen (already de-quantised) layer has no codes to pack")
        mu, sigma = stats(w)
        head.append(_MATRIX.pack(*w.shape, float(mu), float(sigma)))
        body.append(pack_codes(code_indices(w, b).numpy(), b))
    return b"".join(head) + b"".join(body)


def unpack_matrices(data: bytes, names: list[str]) -> tuple[int, list[PackedMatrix]]:
    """Read a packed file written for the layers ``names``; returns (bits, matrices)."""
    if len(data) < _HEAD.size:
        raise ValueError("packed weights file is truncated (no header)")
    magic, version, bits, n, check = _HEAD.unpack_from(data, 0)
    if magic != MAGIC or version != VERSION:
        raise ValueError(f"not a packed low-bit weights file (magic {magic!r}, "
                         f"version {version})")
    if n != len(names) or check != names_check(names):
        raise ValueError(f"packed file holds {n} matrices for other layers than the model's "
                         f"{len(names)}")
    off = _HEAD.size
    shapes = []
    for _ in range(n):
        if bits == 32:
            rows, cols = struct.unpack_from("<II", data, off)
            mu = sigma = 0.0
            off += 8
        else:
            rows, cols, mu, sigma = _MATRIX.unpack_from(data, off)
            off += _MATRIX.size
        shapes.append((rows, cols, mu, sigma))
    out = []
    for rows, cols, mu, sigma in shapes:
        numel = rows * cols
        size = payload_bytes(numel, bits) - (0 if bits == 32 else 8)
        chunk = data[off:off + size]
        if len(chunk) != size:
            raise ValueError("packed weights file is truncated")
        off += size
        values = (np.frombuffer(chunk, dtype="<f4").copy() if bits == 32
                  else unpack_codes(chunk, numel, bits).astype(np.int64))
        out.append(PackedMatrix(rows, cols, mu, sigma, values))
    if off != len(data):
        raise ValueError(f"packed weights file has {len(data) - off} trailing bytes")
    return bits, out
