"""Checkpoint I/O: torch files saved atomically (``engine.atomic``), and safe reads.

Reads never unpickle code: torch files are loaded with ``weights_only=True`` only and
``.safetensors`` through safetensors. A file that needs full unpickling is refused with how to
convert it.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
from typing import Any

import fsspec
import safetensors.torch
import torch

from engine.atomic import write_bytes_atomic
from engine.errors import CheckpointError, CheckpointNotFound


def save_atomic(obj: Any, path: str | os.PathLike) -> str:
    """``torch.save(obj)`` to ``path`` atomically (``engine.atomic.write_bytes_atomic``).

    ``obj`` should hold tensors and plain Python values only, so that :func:`load_file`
    (``weights_only=True``) can read it back.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes_atomic(path, buffer.getvalue())


def _read_bytes(path: str) -> bytes:
    try:
        fs, local = fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as err:
        raise CheckpointError(f"cannot open {path}: {err}") from None
    if not fs.exists(local):
        raise CheckpointNotFound(f"checkpoint not found at {path}; check the path (or URL)")
    if fs.isdir(local):
        raise CheckpointError(f"{path} is a folder; pass the checkpoint file in it")
    with fs.open(local, "rb") as f:
        return f.read()


_CONVERT = (
    "If you trust the file, convert it once in a Python session: "
    "obj = torch.load({path!r}, weights_only=False); then save the state dict alone, "
    "torch.save(obj.state_dict() if hasattr(obj, 'state_dict') else obj['model'], 'converted.pth'), "
    "and pass converted.pth"
)


def _culprit(err: Exception) -> str:
    """The "Unsupported global: ..." line of torch's refusal, if it has one."""
    lines = [line.strip() for line in str(err).splitlines() if "Unsupported global" in line]
    if not lines:
        return ""
    return f" ({lines[0].removeprefix('WeightsUnpickler error: ').split(' was not')[0]})"


def load_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a torch file (``weights_only=True``) or a ``.safetensors`` file (a state dict).

    ``path`` is a local path or an fsspec URL. Raises :class:`CheckpointError` naming the file
    when it is missing, is not a checkpoint, or holds pickled objects beyond tensors and plain
    values (with how to convert such a file).
    """
    path = str(path)
    data = _read_bytes(path)
    if path.endswith(".safetensors"):
        try:
            state = safetensors.torch.load(data)
        except Exception as err:
            raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None
        device = torch.device(map_location)
        return {k: v.to(device) for k, v in state.items()}
    try:
        # Training scripts (the reference's among them) store their argparse namespace: plain
        # values in a plain container, safe to rebuild.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # not a refused class: damaged or not torch
            raise CheckpointError(
                f"{path} is not a readable torch checkpoint (damaged, or another format)"
            ) from None
        raise CheckpointError(
            f"{path} holds pickled Python objects beyond tensors and plain values, which are "
            f"not loaded (unpickling an untrusted file runs code){_culprit(err)}. "
            + _CONVERT.format(path=path)
        ) from None
    except Exception as err:
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from None
