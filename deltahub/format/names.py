"""File names that come from untrusted places: a manifest's ``files``, a shard index's
``weight_map``, a Hub repo listing.

One rule for all of them (format_spec.md, Security considerations):

* A **name** is a plain file name inside its directory: a non-empty string of at most 255
  characters, no ``/`` or ``\\``, not ``.`` or ``..``, no leading ``.`` (hidden files, and
  deltahub's own temporary names), no ``:`` (Windows drives and streams), no control characters.
  So ``directory / name`` can never leave ``directory``.
* A **member** (the file a name points to) is a regular file. A symbolic link is followed only
  when its target stays inside the directory's *root*: the directory itself, or, for a Hub cache
  snapshot (``.../models--ns--name/snapshots/<sha>``), that repository's cache folder, where
  ``huggingface_hub`` keeps the real files (``../../blobs/<hash>``). A link anywhere else (a
  secret, ``/etc/...``, another repository) is refused, never followed.
* An **aux file** of a delta (a ``files`` entry other than the delta's own weights) must not be
  something a rebuild writes or a loader would read as weights or code: not ``config.json``,
  ``delta_config.json``, ``model*.safetensors`` / ``*.safetensors.index.json``, other weight
  formats (``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``, ``*.gguf``, ``*.h5``, ``*.msgpack``,
  ``*.safetensors``: pickles among them run code when loaded) or Python files (``*.py``: remote
  code).

Violations raise :class:`~deltahub.errors.UnsafePathError` naming the source and the name.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from pathlib import Path

from ..errors import MissingFileError, UnsafePathError
from .spec import MANIFEST_NAME, SHARD_PATTERN, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

MAX_NAME_LENGTH = 255
#: Names an aux file may not take: what apply writes, and what a loader would read as weights or code.
FORBIDDEN_AUX_PATTERNS = (
    "config.json", MANIFEST_NAME, "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json",
    "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.h5", "*.msgpack", "*.pkl", "*.pickle", "*.npy", "*.npz", "*.py", "*.pyc",
    "*.so", "*.dll", "*.dylib",
)
_SHARD_PREFIX, _SHARD_SUFFIX = SHARD_PATTERN.split("{index", 1)[0], ".safetensors"


def check_name(name: object, *, what: str, path: str | Path | None = None) -> str:
    """``name`` if it is a plain file name (see the module docstring), else :class:`UnsafePathError`."""
    if not isinstance(name, str) or not name:
        raise UnsafePathError(f"{what}: file name {name!r} is not a non-empty string", path=path)
    shown = repr(name[:80])
    if len(name) > MAX_NAME_LENGTH:
        raise UnsafePathError(f"{what}: file name {shown}… is longer than {MAX_NAME_LENGTH} characters", path=path)
    if name in (".", "..") or "/" in name or "\\" in name:
        raise UnsafePathError(f"{what}: file name {shown} is a path, not a plain name inside the directory", path=path)
    if name.startswith("."):
        raise UnsafePathError(f"{what}: file name {shown} is hidden (starts with '.')", path=path)
    if ":" in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise UnsafePathError(f"{what}: file name {shown} has a ':' or a control character", path=path)
    return name


def is_delta_weights_name(name: str) -> bool:
    """``delta.safetensors``, ``delta-NNNNN-of-MMMMM.safetensors`` or ``delta.safetensors.index.json``."""
    if name in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME):
        return True
    if not (name.startswith(_SHARD_PREFIX) and name.endswith(_SHARD_SUFFIX)):
        return False
    middle = name[len(_SHARD_PREFIX):-len(_SHARD_SUFFIX)].split("-of-")
    return len(middle) == 2 and all(len(p) == 5 and p.isdigit() for p in middle)


def check_listed_file(name: object, *, path: str | Path | None = None) -> str:
    """A ``files`` entry of a manifest: a plain name that is the delta's weights or an allowed aux file."""
    name = check_name(name, what=f"{MANIFEST_NAME} files", path=path)
    if not is_delta_weights_name(name):
        for pattern in FORBIDDEN_AUX_PATTERNS:
            if fnmatch.fnmatchcase(name.lower(), pattern):
                raise UnsafePathError(
                    f"{MANIFEST_NAME} files lists {name!r}, which a delta may not carry (it would replace rebuilt "
                    f"weights/config or be loaded as weights or code: {pattern})", path=path)
    return name


def _root(directory: Path) -> Path:
    """The folder symlinks of ``directory`` may point into: the Hub cache repo folder for a snapshot, else itself."""
    real = directory.resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(("models--", "datasets--", "spaces--")):
        return real.parent.parent
    return real


def member(directory: str | Path, name: object, *, what: str, missing_ok: bool = False) -> Path | None:
    """The regular file ``directory / name``, checked: a plain name, and a regular file (a symlink only
    when it resolves inside the directory's root). ``None`` when absent and ``missing_ok``."""
    directory = Path(directory)
    name = check_name(name, what=what, path=directory)
    path = directory / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise MissingFileError(f"{what}: {name} is missing", path=path) from None
    except OSError as exc:
        raise UnsafePathError(f"{what}: cannot inspect {name!r} ({exc.strerror})", path=directory) from None
    if stat.S_ISLNK(st.st_mode):
        target = path.resolve()
        root = _root(directory)
        if root != target and root not in target.parents:
            raise UnsafePathError(f"{what}: {name!r} is a symbolic link out of the directory (to {str(target)[:120]}); refused", path=directory)
        try:
            st = os.stat(target)
        except OSError:
            raise MissingFileError(f"{what}: {name!r} is a dangling symbolic link", path=path) from None
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(f"{what}: {name!r} is not a regular file", path=directory)
    return path


def path_exists(spec: str | os.PathLike[str]) -> bool:
    """Whether a user-given path exists; False, not an exception, for a name the OS refuses (longer than
    NAME_MAX / PATH_MAX, a NUL byte): such a spec is no local path (callers then try it as a Hub id)."""
    try:
        return Path(spec).exists()
    except (OSError, ValueError):
        return False
