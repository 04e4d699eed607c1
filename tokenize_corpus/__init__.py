"""Stages 1 and 2: train the VQ-KD visual tokenizer and tokenize an image corpus with it.

``load_tokenizer`` is imported lazily so that importing the package (e.g. for ``--help``) does not
import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_tokenizer"]


def __getattr__(name: str) -> Any:
    if name == "load_tokenizer":
        from tokenize_corpus.tokenizer import load_tokenizer

        return load_tokenizer
    raise AttributeError(f"module 'tokenize_corpus' has no attribute {name!r}")
