"""Numeric precision as one setting: ``precision=auto|fp32|bf16|fp16`` for every stage.

Half precision means autocast, never half-precision weights in training: parameters, optimizer
state and the numerically delicate tail of each model (the tokenizer's task layer and codebook
lookup, docs/method.md §1; the losses) stay in fp32. Only a frozen tokenizer's encoder, for
inference, also holds a half copy of the weights autocast would cast anyway, which gives the same
values without casting them every batch (``tokenize_corpus.tokenizer.half_encoder_copy``); its
weights, fingerprint and files stay fp32. ``auto`` picks bf16 where the hardware runs it fast
(CUDA devices with bf16 support, CPUs with AVX512-BF16 or AMX) and fp32 elsewhere, so the same
config is fast on a laptop, a CPU cluster and a GPU node. The resolved value, not ``auto``, is
what runs record (a token dataset's identity depends on it, docs/design.md §3).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from engine.errors import PrecisionError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 arithmetic (AVX512-BF16 or AMX tiles)."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def _device_type(device: torch.device | str | None) -> str:
    if device is None:
        return "cpu"
    return torch.device(device).type


def resolve_precision(requested: str, device: torch.device | str | None) -> str:
    """The concrete precision (``fp32``, ``bf16`` or ``fp16``) to run on ``device``.

    ``auto`` becomes ``bf16`` on CUDA with bf16 support or on a CPU with fast bf16, else
    ``fp32``. Explicit values are returned as given, except that fp16 is refused on CPU (CPU
    CPUs have no fast fp16 arithmetic; bf16 is their half precision) and bf16 is refused on a CUDA
    device without it.
    """
    if requested not in PRECISIONS:
        raise PrecisionError(
            f"precision={requested!r} is not one of {', '.join(PRECISIONS)}; "
            "use auto (bf16 where the hardware is fast at it) or fp32 (exact)"
        )
    kind = _device_type(device)
    if requested == "auto":
        if kind == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        if kind == "cpu":
            return "bf16" if cpu_supports_bf16() else "fp32"
        return "fp32"
    if requested == "fp16" and kind == "cpu":
        raise PrecisionError(
            "precision=fp16 is for GPUs; on CPU use precision=bf16 (or auto) or fp32"
        )
    if requested == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise PrecisionError(
            "precision=bf16 needs a GPU with bf16 support (Ampere or newer); "
            "use precision=fp16 or fp32 on this device"
        )
    return requested


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None for fp32)."""
    if precision == "fp32":
        return None
    if precision not in _DTYPES:
        raise PrecisionError(
            f"precision={precision!r} is not a resolved precision (fp32, bf16, fp16); "
            "pass it through resolve_precision first"
        )
    return _DTYPES[precision]


@contextlib.contextmanager
def autocast(precision: str, device: torch.device | str | None) -> Iterator[None]:
    """Autocast at ``precision`` on ``device`` (a no-op for fp32).

    ``precision`` may be ``auto``; it is resolved for ``device`` first.
    """
    resolved = resolve_precision(precision, device)
    dtype = autocast_dtype(resolved)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=_device_type(device), dtype=dtype):
        yield
