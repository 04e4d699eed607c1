"""The user errors of the ``shards`` layer: a token dataset or its images are not what they claim.

Every class here is an :class:`engine.errors.UserError`: the CLI prints the message (which names
the file or key and what to do) and exits 2, without a traceback. Raised inside a DataLoader
worker, torch re-raises an error in the main process as ``type(err)("Caught ... Original
Traceback ...")``; :class:`DataIntegrityError` strips that wrapping again so the user reads the
message, not a worker traceback.
"""

from __future__ import annotations

import re

from engine.errors import UserError

# How torch's ExceptionWrapper formats the original error's last line: "pkg.Class: message".
_LAST_LINE = re.compile(r"^[A-Za-z_][\w.]*: (.*)$")


def unwrap_worker_message(message: str) -> str:
    """The original message of an error torch re-raised from a DataLoader worker."""
    if not (message.startswith("Caught ") and "Original Traceback" in message):
        return message
    for line in reversed(message.rstrip().splitlines()):
        match = _LAST_LINE.match(line)
        if match:
            return match.group(1)
    return message


class DataIntegrityError(UserError):
    """A token dataset (or the images read with it) is not what it claims; the message says what
    to do. Keeps its plain message when re-raised from a DataLoader worker."""

    def __init__(self, message: str = "") -> None:
        super().__init__(unwrap_worker_message(str(message)))


class TokenDatasetMismatch(DataIntegrityError):
    """The token dataset does not match the tokenizer / model / schema it is used with."""


class MissingShards(DataIntegrityError, FileNotFoundError):
    """Shards of the token dataset are not there (the tokenize run failed or did not finish)."""


class CorruptTokenShard(DataIntegrityError):
    """A token file is missing, truncated or damaged."""


class ImageDigestMismatch(DataIntegrityError):
    """An image's bytes are not the ones its tokens were computed from."""


class DuplicateKeys(DataIntegrityError):
    """A token dataset holds a key twice: two rows for one image, so it is damaged."""


class TokenSetNotFound(UserError):
    """``token_set=`` names no token set of the dataset (or several)."""


class ImageSourceError(UserError):
    """An image source cannot be listed or read as asked (no such path, nothing in it, ...)."""


def rerun_stage2(path: str, what: str) -> str:
    """The remedy for damaged token files, spelled once."""
    return (
        f"{what}: rerun stage 2 on it (`pipeline run stage=tokenize` with the same images=, "
        f"tokenizer= and out_dir={path}; it redoes only damaged or missing shards) and "
        f"`pipeline validate {path}` lists every damaged file"
    )
