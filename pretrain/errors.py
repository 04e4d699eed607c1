"""The user errors of stage 3 and the evaluations: images and tokens that do not fit together, a
checkpoint or backbone that does not fit the model asked for.

Every class here is an :class:`engine.errors.UserError` (through ``shards.errors`` for the data
ones): the CLI prints the message and exits 2, without a traceback.
"""

from __future__ import annotations

from engine.errors import UserError
from shards.errors import DataIntegrityError


class PretrainDataError(DataIntegrityError):
    """Image shards and token shards do not fit together; the message says what to do."""


class BackboneError(UserError):
    """A checkpoint or backbone file that does not fit the model asked for."""


class BackboneNotFound(BackboneError, FileNotFoundError):
    """No file at the backbone path (also a ``FileNotFoundError``)."""
