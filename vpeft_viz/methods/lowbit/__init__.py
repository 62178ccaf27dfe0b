"""Low-bit adapters (Bi-AdaptFormer, Bi-LoRA): the quantiser and packed storage in
:mod:`.quant`, the methods in :mod:`.methods`."""

from . import methods, quant  # noqa: F401  (registration)
