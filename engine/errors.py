"""The user errors of every layer's core: :class:`UserError` and the ``engine`` subclasses.

Library code raises :class:`UserError` (or a subclass) with a message that says what was wrong and
what to do; the CLI prints the message and exits 2, without a traceback. Anything else that
escapes is a bug and keeps its traceback. The layers above keep theirs in one module each
(``shards.errors``, ``tokenize_corpus.errors``, ``pretrain.errors``).
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user asked for; the message names it and the fix."""


class ConfigError(UserError):
    """A config key or value is invalid; the message says which and what is allowed."""


class PrecisionError(UserError):
    """An unknown precision, or one the device cannot run."""


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable or not loadable safely; the message says why."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """No file at the given path (also a ``FileNotFoundError``)."""


class OutDirBusy(UserError):
    """Another run holds the output folder (``engine.lock``)."""


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; training cannot recover by itself."""
