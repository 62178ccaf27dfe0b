"""Images of a split as normalised tensors, and deterministic loaders over them.

The VTAB-1k protocol (https://arxiv.org/abs/1910.04867, as run by NOAH and V-PETL Bench) resizes
every image straight to the backbone's input size and uses no augmentation, so a decoded image
never changes between epochs. A split is therefore decoded once into one uint8 tensor
(N x 3 x H x W) and each batch is a tensor index, a float conversion and a normalisation.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from vpeft_viz.data.formats import DataError, Sample

NORMALIZATIONS = ("backbone", "imagenet", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Stats = tuple[float, float, float]


def _stats(values: Sequence[float], what: str) -> Stats:
    as_tuple = tuple(float(v) for v in values)
    if len(as_tuple) != 3:
        raise DataError(f"{what} needs 3 values (R, G, B); got {list(values)}")
    return as_tuple  # type: ignore[return-value]


def resolve_normalization(
    kind: str, backbone_mean: Sequence[float], backbone_std: Sequence[float]
) -> tuple[Stats, Stats]:
    """(mean, std) per RGB channel for a normalisation choice offered to the user.

    ``"backbone"`` uses the statistics the backbone was pretrained with (what it expects);
    ``"imagenet"`` the usual ImageNet ones (what NOAH and V-PETL Bench apply to VTAB-1k whatever
    the backbone); ``"none"`` leaves pixels in [0, 1] (mean 0, std 1).
    """
    if kind == "backbone":
        mean = _stats(backbone_mean, "backbone mean")
        std = _stats(backbone_std, "backbone std")
    elif kind == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif kind == "none":
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
        raise DataError(f"unknown normalization {kind!r}; allowed: {', '.join(NORMALIZATIONS)}")
    if min(std) <= 0:
        raise DataError(f"normalization std must be positive; got {list(std)}")
    return mean, std


# Modes Pillow converts to 8-bit RGB without losing range (palette, grey, alpha, CMYK, ...).
_EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX",
                              "CMYK", "YCbCr", "LAB", "HSV"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def to_rgb8(image: Image.Image, path: Path | str) -> Image.Image:
    """``image`` as 8-bit RGB with its range scaled, not clipped.

    ``convert("RGB")`` clips 16-bit and 32-bit integer pixels at 255 (a 16-bit image turns
    white) and float pixels in [0, 1] to 0 or 1 (black): here 16-bit greys are divided by 257
    (65535 → 255), float images in [0, 1] are multiplied by 255 and ones already in [0, 255]
    kept; anything else is refused with a :class:`DataError` naming the file.
    """
    mode = image.mode
    if mode in _EIGHT_BIT_MODES:
        return image.convert("RGB")
    if mode not in _SIXTEEN_BIT_MODES and mode not in ("I", "F"):
        raise DataError(f"cannot read image {path}: pixel mode {mode!r} is not supported; "
                        "save it as 8-bit RGB or greyscale")
    pixels = np.asarray(image, dtype=np.float64)
    if not np.isfinite(pixels).all():
        raise DataError(f"cannot read image {path}: it holds NaN or infinite pixel values")
    lo, hi = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        pixels = pixels * 255.0
    elif mode == "F" and lo >= 0.0 and hi <= 255.0:
        pass
    elif mode != "F" and lo >= 0.0 and hi <= 65535.0:
        pixels = pixels / 257.0  # 16-bit range (mode I is how Pillow opens many 16-bit PNGs)
    else:
        kind = "float" if mode == "F" else "32-bit integer"
        raise DataError(f"cannot read image {path}: {kind} pixels range over [{lo:g}, {hi:g}], "
                        "neither [0, 1] nor [0, 255] nor 16-bit; convert it to 8-bit")
    grey = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")
    return grey.convert("RGB")


def decode_image(path: Path | str, image_size: int) -> torch.Tensor:
    """One image file as a 3 x image_size x image_size uint8 tensor (RGB, bilinear, antialiased).

    Any failure to open or decode raises :class:`DataError` naming the file.
    """
    try:
        with Image.open(path) as image:
            rgb = to_rgb8(image, path)
            resized = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"cannot read image {path}: {exc}") from None
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)


def check_image(path: Path | str, where: str = "") -> str:
    """Decode ``path`` cheaply (JPEGs at reduced scale) and return a hash of its bytes.

    Raises :class:`DataError` naming the file (and ``where``: the split file and line that
    lists it) when it cannot be decoded or converted; the hash finds duplicates across splits.
    """
    import hashlib

    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (64, 64))
            image.load()
            to_rgb8(image, path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        prefix = f"{where}: " if where else ""
        if isinstance(exc, DataError):
            raise DataError(f"{prefix}{exc}") from None
        raise DataError(f"{prefix}cannot read image {path}: {exc}") from None
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class ImageDataset(Dataset):
    """A split's images, resized and normalised, with their labels.

    ``dataset[i]`` gives ``(float tensor 3 x H x W, int label)``. ``dataset[[i, j, ...]]`` gives
    a whole batch ``(float tensor B x 3 x H x W, int64 tensor B)``; :func:`make_loader` uses it.
    With ``cache=True`` each image is decoded once and kept as uint8 (3 * H * W bytes: 150 KB at
    224 px, so a 1000-image VTAB train split takes 150 MB); use ``cache=False`` for large test
    sets. :meth:`preload` decodes everything up front so every epoch is pure tensor work.
    """

    def __init__(
        self,
        samples: list[Sample],
        *,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        num_classes: int,
        cache: bool = True,
    ) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive; got {image_size}")
        mean_t, std_t = _stats(mean, "mean"), _stats(std, "std")
        if min(std_t) <= 0:
            raise DataError(f"normalization std must be positive; got {list(std_t)}")
        for sample in samples:
            if not 0 <= sample.label < num_classes:
                raise DataError(
                    f"label {sample.label} of image {sample.path} is out of range for "
                    f"{num_classes} classes"
                )
        self.samples = list(samples)
        self.image_size = image_size
        self.num_classes = num_classes
        self.cache = cache
        self.mean = mean_t
        self.std = std_t
        self.labels = torch.tensor([s.label for s in self.samples], dtype=torch.long)
        # x_norm = x_uint8 * scale - shift  ==  (x_uint8 / 255 - mean) / std
        std_tensor = torch.tensor(std_t).view(3, 1, 1)
        self._scale = 1.0 / (255.0 * std_tensor)
        self._shift = torch.tensor(mean_t).view(3, 1, 1) / std_tensor
        self._pixels: torch.Tensor | None = None  # N x 3 x H x W uint8, allocated on first use
        self._decoded = torch.zeros(len(self.samples), dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.samples)

    def _cache_tensor(self) -> torch.Tensor:
        if self._pixels is None:
            size = self.image_size
            self._pixels = torch.empty((len(self.samples), 3, size, size), dtype=torch.uint8)
        return self._pixels

    def _uint8(self, indices: list[int]) -> torch.Tensor:
        """uint8 pixels of ``indices`` (B x 3 x H x W), decoding what is not cached yet."""
        if not self.cache:
            return torch.stack(
                [decode_image(self.samples[i].path, self.image_size) for i in indices]
            )
        pixels = self._cache_tensor()
        for i in indices:
            if not self._decoded[i]:
                pixels[i] = decode_image(self.samples[i].path, self.image_size)
                self._decoded[i] = True
        return pixels[indices]

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(-self._shift, pixels.float(), self._scale)

    def __getitem__(self, index: int | Sequence[int]) -> tuple[torch.Tensor, int | torch.Tensor]:
        if isinstance(index, int | np.integer):
            i = int(index)
            if i < 0:
                i += len(self)
            if not 0 <= i < len(self):
                raise IndexError(f"index {index} out of range for {len(self)} images")
            return self._normalise(self._uint8([i])[0]), int(self.labels[i])
        indices = [int(i) for i in index]
        return self._normalise(self._uint8(indices)), self.labels[indices]

    def preload(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Decode every image now and keep it (turns ``cache`` on); ``progress(done, total)``."""
        self.cache = True
        pixels = self._cache_tensor()
        total = len(self.samples)
        for i, sample in enumerate(self.samples):
            if not self._decoded[i]:
                pixels[i] = decode_image(sample.path, self.image_size)
                self._decoded[i] = True
            if progress is not None:
                progress(i + 1, total)


def make_loader(
    dataset: ImageDataset, *, batch_size: int, shuffle: bool, seed: int, drop_last: bool = False
) -> DataLoader:
    """Batches of ``(images B x 3 x H x W, labels B)``, the same order for the same ``seed``.

    Each batch is fetched with one call (``dataset[list_of_indices]``): a batch sampler feeds
    index lists and automatic collation is off, so a preloaded split costs one tensor gather per
    batch. No worker processes: the data is in memory, and on a few CPU cores workers cost more
    than they save. Iterating the loader again continues the seeded generator, so each epoch
    gets a new order and the sequence of orders is reproducible.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive; got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    order = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    batches = BatchSampler(order, batch_size=batch_size, drop_last=drop_last)
    return DataLoader(dataset, sampler=batches, batch_size=None, num_workers=0, generator=generator)


def class_counts(samples: list[Sample], num_classes: int) -> list[int]:
    """Number of samples per class (index = label), e.g. to show a split's balance."""
    counts = [0] * num_classes
    for sample in samples:
        if not 0 <= sample.label < num_classes:
            raise DataError(
                f"label {sample.label} of image {sample.path} is out of range for "
                f"{num_classes} classes"
            )
        counts[sample.label] += 1
    return counts
