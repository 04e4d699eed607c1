"""The CLI's logging: our INFO lines by default, the libraries' (Dask, Bokeh, Tornado) only when asked.

Dask's scheduler and workers log a few dozen INFO lines at start-up that bury the lines a user
needs. By default those libraries log at WARNING; ``--verbose`` (or ``log_level=debug``) brings
them back. Dask worker processes configure their logging from Dask's config when they start, so
the level is also passed down as ``DASK_LOGGING__DISTRIBUTED`` in the environment they inherit.
"""

from __future__ import annotations

import logging
import os

from engine.errors import ConfigError

# Libraries whose INFO logging is noise at the command line.
QUIET_LOGGERS = ("distributed", "dask", "bokeh", "tornado", "fsspec", "matplotlib", "PIL")
LEVELS = ("debug", "info", "warning", "error")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def pop_logging_options(argv: list[str]) -> tuple[list[str], bool, str | None]:
    """``argv`` without ``--verbose``/``-v``/``log_level=<level>``, and those two settings."""
    rest, verbose, level = [], False, None
    for arg in argv:
        if arg in ("--verbose", "-v"):
            verbose = True
        elif arg.startswith("log_level="):
            level = arg.split("=", 1)[1].strip().lower()
            if level not in LEVELS:
                raise ConfigError(
                    f"log_level={level!r} is not allowed; choose one of: {', '.join(LEVELS)}"
                )
        else:
            rest.append(arg)
    return rest, verbose, level


def setup_logging(verbose: bool = False, level: str | None = None) -> None:
    """Our loggers at ``level`` (default info, debug with ``verbose``); libraries at warning."""
    ours = (level or ("debug" if verbose else "info")).upper()
    theirs = "INFO" if verbose or ours == "DEBUG" else "WARNING"
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format=FORMAT)
    root.setLevel(ours)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(theirs)
    # read by dask.config when distributed is imported, here and in every worker process
    os.environ["DASK_LOGGING__DISTRIBUTED"] = theirs.lower()
