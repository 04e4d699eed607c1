"""The user errors of stages 1 and 2: a tokenizer or teacher that cannot be used, a refused resume.

Every class here is an :class:`engine.errors.UserError`: the CLI prints the message (which names
the file or key and what to do) and exits 2, without a traceback. ``ClusterLost`` is not one: a
cluster that goes away is a failed run (exit 1, a rerun resumes), so it stays in
``tokenize_corpus.cluster``.
"""

from __future__ import annotations

from engine.errors import UserError


class TokenizerError(UserError):
    """A file that is not a loadable VQ-KD tokenizer; the message says what to pass instead."""


class TeacherError(UserError):
    """A teacher cannot be built; the message says why and what to do."""


class ResumeRefused(UserError):
    """out_dir holds shards made by another job; the message names what differs."""
