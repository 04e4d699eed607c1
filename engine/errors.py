"""The one exception type for a user's mistake (bad path, value, or mismatched data).

Library code raises :class:`UserError` (or a subclass) with a message that says what was wrong and
what to do; the CLI prints the message and exits 2, without a traceback. Anything else that
escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user asked for; the message names it and the fix."""
