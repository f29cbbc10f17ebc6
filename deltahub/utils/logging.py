"""deltahub's logging, in the style of ``transformers.utils.logging`` / ``huggingface_hub.utils.logging``.

Every module logs to a child of the library root logger ``"deltahub"``::

    from deltahub.utils import logging
    logger = logging.get_logger(__name__)
    logger.info("resolved base %s to %s", repo_id, sha)

The root logger has a :class:`logging.NullHandler` and propagates as usual: an
application that configures :mod:`logging` sees deltahub's records, a plain library user sees
only warnings and errors (Python's last-resort handler). The level comes from
``DELTAHUB_VERBOSITY`` (``debug``, ``info``, ``warning``, ``error``, ``critical``; default
``warning``) or :func:`set_verbosity`. The CLI's ``--verbose`` shows INFO records on stderr.
"""

from __future__ import annotations

import logging
import os
import threading
from logging import CRITICAL, DEBUG, ERROR, INFO, NOTSET, WARNING  # noqa: F401  (re-exported, like transformers)

LIBRARY_NAME = "deltahub"
ENV_VAR = "DELTAHUB_VERBOSITY"
DEFAULT_LEVEL = logging.WARNING

log_levels = {"debug": DEBUG, "info": INFO, "warning": WARNING, "error": ERROR, "critical": CRITICAL}

_lock = threading.Lock()
_configured = False


def _env_level() -> int:
    """The level named by ``DELTAHUB_VERBOSITY``, else WARNING (an unknown name warns once and is ignored)."""
    value = os.environ.get(ENV_VAR)
    if not value:
        return DEFAULT_LEVEL
    level = log_levels.get(value.strip().lower())
    if level is None:
        logging.getLogger(LIBRARY_NAME).warning(
            "unknown %s=%r; use one of %s", ENV_VAR, value, ", ".join(log_levels))
        return DEFAULT_LEVEL
    return level


def _configure_library_root_logger() -> None:
    global _configured
    with _lock:
        if _configured:
            return
        root = logging.getLogger(LIBRARY_NAME)
        root.addHandler(logging.NullHandler())
        root.setLevel(_env_level())
        _configured = True


def _get_library_root_logger() -> logging.Logger:
    _configure_library_root_logger()
    return logging.getLogger(LIBRARY_NAME)


def get_logger(name: str | None = None) -> logging.Logger:
    """The logger ``name`` (usually ``__name__``, a child of ``"deltahub"``); the library root logger when ``None``."""
    _configure_library_root_logger()
    return logging.getLogger(name if name is not None else LIBRARY_NAME)


def get_verbosity() -> int:
    """The library root logger's level (``logging.WARNING`` by default)."""
    return _get_library_root_logger().getEffectiveLevel()


def set_verbosity(verbosity: int | str) -> None:
    """Set the level of every deltahub logger: ``logging.INFO``, ``"info"``, ..."""
    if isinstance(verbosity, str):
        try:
            verbosity = log_levels[verbosity.strip().lower()]
        except KeyError:
            raise ValueError(f"unknown verbosity {verbosity!r}; use one of {', '.join(log_levels)}") from None
    _get_library_root_logger().setLevel(verbosity)


def set_verbosity_debug() -> None:
    set_verbosity(DEBUG)


def set_verbosity_info() -> None:
    set_verbosity(INFO)


def set_verbosity_warning() -> None:
    set_verbosity(WARNING)


def set_verbosity_error() -> None:
    set_verbosity(ERROR)


def add_handler(handler: logging.Handler) -> None:
    """Attach ``handler`` to the library root logger."""
    _get_library_root_logger().addHandler(handler)


def remove_handler(handler: logging.Handler) -> None:
    """Detach a handler added with :func:`add_handler`."""
    _get_library_root_logger().removeHandler(handler)
