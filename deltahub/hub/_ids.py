"""Hub model specs: ``namespace/name[@revision]`` (the repo-id grammar of ``huggingface_hub``)."""

from __future__ import annotations

import os
import re

from ..errors import HubError
from ..format.names import path_exists

# The Hub's repo-id grammar (huggingface_hub.utils.validate_repo_id), namespace required.
_NAME = r"[A-Za-z0-9_](?:[\w.\-]{0,94}[A-Za-z0-9_])?"
_REPO_ID_RE = re.compile(rf"{_NAME}/{_NAME}")
SHA_RE = re.compile(r"[0-9a-f]{40}")


def is_hub_id(text: str) -> bool:
    """True if ``text`` is a well-formed ``namespace/name`` repo id (no local-path check)."""
    return bool(_REPO_ID_RE.fullmatch(text)) and "--" not in text and ".." not in text and not text.endswith(".git")


def parse_model_spec(spec: str) -> tuple[str, str | None]:
    """``"user/model@rev"`` -> ``("user/model", "rev")``; ``"user/model"`` -> ``("user/model", None)``.

    The revision (branch, tag or commit sha) is everything after the first ``@``. Raises
    :class:`HubError` if the part before it is not a ``namespace/name`` repo id.
    """
    repo_id, sep, revision = str(spec).partition("@")
    if not is_hub_id(repo_id) or (sep and not revision):
        raise HubError(f"{spec!r} is not a Hub model id of the form namespace/name[@revision]")
    return repo_id, (revision or None)


def is_hub_spec(spec: str | os.PathLike[str]) -> bool:
    """A string names a Hub model iff it is not an existing local path and parses as ``namespace/name[@rev]``.

    ``Path`` objects are always local: the caller said so.
    """
    if isinstance(spec, os.PathLike) or path_exists(spec):
        return False
    try:
        parse_model_spec(str(spec))
    except HubError:
        return False
    return True
