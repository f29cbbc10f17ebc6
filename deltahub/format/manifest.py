"""The manifest, ``delta_config.json``: what a delta is, against which base, and how each tensor is coded."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CorruptFileError, ManifestError, MissingFileError, UnsupportedFormatError
from . import integrity
from .names import check_listed_file, is_delta_weights_name
from .spec import ALIAS_CODEC, FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, NAME_TO_DTYPE, check_version


@dataclass
class TensorEntry:
    """How one tensor of the fine-tune is stored.

    ``stored`` maps codec roles (``"sign"``, ``"scale"``, ...) to tensor names in the delta's
    safetensors files; ``base_sha256`` is the sha256 of the base tensor's bytes it applies to.
    """

    codec: str
    shape: list[int]
    dtype: str
    params: dict[str, Any] = field(default_factory=dict)
    stored: dict[str, str] = field(default_factory=dict)
    stored_bytes: int = 0
    base_sha256: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    #: role -> tensor digest of the stored tensor (format 1.1, see :mod:`.integrity`).
    digests: dict[str, str] = field(default_factory=dict)

    @property
    def alias_of(self) -> str | None:
        """The entry this one is an alias of (format 1.3, ``codec`` ``"alias"``), else None."""
        if self.codec != ALIAS_CODEC:
            return None
        target = self.params.get("target")
        return target if isinstance(target, str) else None

    def to_dict(self) -> dict[str, Any]:
        # Copies of the containers (JSON values: plain data), not dataclasses.asdict's deep copy, which took
        # most of the time of sizing candidate entries during compress's allocation.
        d = {"codec": self.codec, "shape": list(self.shape), "dtype": self.dtype, "params": _copy_json(self.params),
             "stored": dict(self.stored), "stored_bytes": self.stored_bytes, "base_sha256": self.base_sha256,
             "stats": dict(self.stats), "digests": dict(self.digests)}
        if d["base_sha256"] is None:
            del d["base_sha256"]
        if not d["stats"]:
            del d["stats"]
        if not d["digests"]:
            del d["digests"]
        return d


def _copy_json(v: Any) -> Any:
    """A copy of plain JSON data (dicts and lists copied, scalars shared)."""
    if isinstance(v, dict):
        return {k: _copy_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_copy_json(x) for x in v]
    return v


@dataclass
class BaseInfo:
    """The base model a delta applies to: where it came from and its content fingerprint."""

    name_or_path: str
    fingerprint: str
    revision: str | None = None
    #: Tensors of the base that the fine-tune does not have: name -> {dtype, shape, sha256}.
    extra_tensors: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Manifest:
    """In-memory form of ``delta_config.json`` (format_spec.md, Manifest)."""

    base: BaseInfo
    tensors: dict[str, TensorEntry]
    config: dict[str, Any] | None = None
    finetuned: dict[str, Any] = field(default_factory=dict)
    totals: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    #: file name -> digest of every ``files`` entry that is not a delta safetensors file (format 1.1).
    file_digests: dict[str, str] = field(default_factory=dict)
    #: Aux files the rebuilt model takes from the base's folder: name -> digest of their bytes (format 1.2).
    base_files: dict[str, str] = field(default_factory=dict)
    created_with: str = ""
    #: Informative record of a distillation run (format_spec.md, section 1); None when none ran.
    distillation: dict[str, Any] | None = None
    format: str = FORMAT_NAME
    format_version: str = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "format_version": self.format_version,
            "created_with": self.created_with,
            "base": asdict(self.base),
            "finetuned": self.finetuned,
            "config": self.config,
            "totals": self.totals,
            "files": self.files,
            **({"file_digests": self.file_digests} if self.file_digests else {}),
            **({"base_files": self.base_files} if self.base_files else {}),
            **({"distillation": self.distillation} if self.distillation is not None else {}),
            "tensors": {k: v.to_dict() for k, v in self.tensors.items()},
        }

    def coded(self, name: str) -> tuple[str, TensorEntry]:
        """``(name, entry)`` of the entry that holds tensor ``name``'s coding: its alias target for an alias
        entry (validated on load: an existing, earlier, non-alias entry of the same shape, dtype and base),
        else ``name`` itself. Everything that decodes a tensor goes through here."""
        entry = self.tensors[name]
        target = entry.alias_of
        return (target, self.tensors[target]) if target is not None else (name, entry)

    def aliases(self) -> dict[str, str]:
        """Alias entry name -> target name, in manifest order."""
        return {n: e.alias_of for n, e in self.tensors.items() if e.alias_of is not None}

    def to_json(self) -> str:
        """The ``delta_config.json`` text, ``manifest_digest`` included (format 1.1)."""
        return integrity.manifest_bytes(self.to_dict()).decode()

    @classmethod
    def from_dict(cls, d: Any, *, path: str | Path | None = None) -> Manifest:
        """Validate and load; refuses other formats and unknown major versions with a typed error."""
        if not isinstance(d, dict):
            raise UnsupportedFormatError("manifest is not a JSON object", path=path)
        if d.get("format") != FORMAT_NAME:
            raise UnsupportedFormatError(f"not a deltahub manifest (format={d.get('format')!r}, expected {FORMAT_NAME!r})", path=path)
        check_version(d.get("format_version"), path=str(path) if path else None)
        try:
            b = d["base"]
            if not isinstance(b, dict):
                raise ManifestError("base is not a JSON object", path=path)
            base = BaseInfo(
                name_or_path=_string(b["name_or_path"], "base.name_or_path", path),
                fingerprint=_string(b["fingerprint"], "base.fingerprint", path),
                revision=b.get("revision"),
                extra_tensors=_extra_tensors(b.get("extra_tensors"), path),
            )
            if not _FINGERPRINT.fullmatch(base.fingerprint):
                raise ManifestError(f"base.fingerprint {base.fingerprint[:80]!r} is not 'sha256:' + 64 lowercase hex digits", path=path)
            if base.revision is not None and not isinstance(base.revision, str):
                raise ManifestError(f"base.revision must be a string or null, got {type(base.revision).__name__}", path=path)
            raw_tensors = d["tensors"]
            if not isinstance(raw_tensors, dict):
                raise ManifestError("tensors is not a JSON object", path=path)
            tensors = {}
            for name, e in raw_tensors.items():
                tensors[name] = _tensor_entry(name, e, path)
            _check_aliases(tensors, path)
        except KeyError as exc:
            raise ManifestError(f"manifest is missing the field {exc.args[0]!r}", path=path) from None
        config = d.get("config")
        if config is not None and not isinstance(config, dict):
            raise ManifestError(f"config must be a JSON object or null, got {type(config).__name__}", path=path)
        archs = (config or {}).get("architectures")
        if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) and _IDENTIFIER.fullmatch(a) for a in archs)):
            raise ManifestError(f"config.architectures must be a list of class names, got {str(archs)[:80]}", path=path)
        finetuned = d.get("finetuned") or {}
        if not isinstance(finetuned, dict):
            raise ManifestError(f"finetuned must be a JSON object, got {type(finetuned).__name__}", path=path)
        if not isinstance(d.get("files") or [], list):
            raise ManifestError(f"files must be a list, got {type(d.get('files')).__name__}", path=path)
        files = [check_listed_file(f, path=path) for f in d.get("files") or []]
        if len(set(files)) != len(files):
            raise ManifestError("files lists a name twice", path=path)
        base_files = _base_files(d.get("base_files"), files, path)
        created_with = d.get("created_with", "")
        if not isinstance(created_with, str):
            raise ManifestError(f"created_with must be a string, got {type(created_with).__name__}", path=path)
        return cls(
            base=base,
            tensors=tensors,
            config=config,
            finetuned=dict(finetuned),
            totals=_informative(d.get("totals")),
            files=files,
            file_digests=_digest_map(d.get("file_digests"), "file_digests", path),
            base_files=base_files,
            created_with=created_with,
            distillation=d["distillation"] if isinstance(d.get("distillation"), dict) else None,
            format=d["format"],
            format_version=str(d["format_version"]),
        )

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        """Read ``delta_config.json`` from a delta directory."""
        path = Path(directory) / MANIFEST_NAME
        try:
            found = path.is_file()
        except (OSError, ValueError) as exc:  # a name the OS refuses (too long, a NUL byte)
            raise MissingFileError(f"delta path cannot be opened: {getattr(exc, 'strerror', None) or exc}", path=Path(directory)) from None
        if not found:
            raise MissingFileError(f"no {MANIFEST_NAME}: not a deltahub delta directory", path=Path(directory))
        raw = path.read_bytes()
        try:
            d = json.loads(raw.decode("utf-8"), object_pairs_hook=unique_keys)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise CorruptFileError(f"manifest is not valid JSON ({str(exc)[:200]})", path=path) from None
        except DuplicateKeyError as exc:
            raise CorruptFileError(f"manifest is ambiguous: {exc}", path=path) from None
        manifest = cls.from_dict(d, path=path)
        integrity.verify_manifest_bytes(raw, d, path=path)
        integrity.check_manifest_digests(manifest, d, path=path)
        return manifest


# ------------------------------------------------------------------ validation of untrusted manifests

_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
#: Bound on every dimension and on the element count of a manifest tensor (1 Ti elements).
MAX_NUMEL = 1 << 40


class DuplicateKeyError(ValueError):
    """A JSON object has the same key twice (readers would disagree on which value counts)."""


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json`` ``object_pairs_hook`` refusing duplicate keys."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKeyError(f"the key {k[:80]!r} appears twice in one JSON object")
        out[k] = v
    return out


def _string(value: Any, what: str, path: Any) -> str:
    if not isinstance(value, str):
        raise ManifestError(f"{what} must be a string, got {type(value).__name__}", path=path)
    return value


def check_shape(shape: Any, what: str, path: Any) -> list[int]:
    """A JSON shape: a list of non-negative ints (not bools), each and their product at most 2^40."""
    if not isinstance(shape, list) or len(shape) > 64:
        raise ManifestError(f"{what}: shape must be a list of at most 64 integers, got {str(shape)[:80]}", path=path)
    numel = 1
    for s in shape:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_NUMEL:
            raise ManifestError(f"{what}: shape {str(shape)[:80]} has {str(s)[:40]!s}, not an integer in [0, 2^40]", path=path)
        numel *= s
    if numel > MAX_NUMEL:
        raise ManifestError(f"{what}: shape {shape} has {numel} elements, more than 2^40", path=path)
    return list(shape)


def _tensor_entry(name: Any, e: Any, path: Any) -> TensorEntry:
    if not isinstance(name, str) or not name:
        raise ManifestError(f"tensor names must be non-empty strings, got {name!r}", path=path)
    what = f"tensor {name[:200]!r}"
    if not isinstance(e, dict):
        raise ManifestError(f"{what}: entry is not a JSON object", path=path)
    try:
        codec, shape, dtype = e["codec"], e["shape"], e["dtype"]
    except KeyError as exc:
        raise ManifestError(f"{what}: entry has no {exc.args[0]!r}", path=path) from None
    if not isinstance(codec, str):
        raise ManifestError(f"{what}: codec must be a string, got {type(codec).__name__}", path=path)
    shape = check_shape(shape, what, path)
    if not isinstance(dtype, str) or dtype not in NAME_TO_DTYPE:
        raise ManifestError(f"{what}: dtype {str(dtype)[:40]!r} is not one of {', '.join(sorted(NAME_TO_DTYPE))}", path=path)
    params = e.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ManifestError(f"{what}: params must be a JSON object, got {type(params).__name__}", path=path)
    stored = e.get("stored", {})
    if stored is None:
        stored = {}
    if not isinstance(stored, dict) or not all(isinstance(k, str) and k and isinstance(v, str) and v for k, v in stored.items()):
        raise ManifestError(f"{what}: stored must map role names to stored tensor names (non-empty strings)", path=path)
    stored_bytes = e.get("stored_bytes", 0)
    if isinstance(stored_bytes, bool) or not isinstance(stored_bytes, int) or stored_bytes < 0:
        stored_bytes = 0  # informative (the files' headers are authoritative)
    base_sha256 = e.get("base_sha256")
    if base_sha256 is not None and (not isinstance(base_sha256, str) or not _SHA256.fullmatch(base_sha256)):
        raise ManifestError(f"{what}: base_sha256 must be 64 lowercase hex digits, got {str(base_sha256)[:80]!r}", path=path)
    return TensorEntry(codec=codec, shape=shape, dtype=dtype, params=dict(params), stored=dict(stored),
                       stored_bytes=stored_bytes, base_sha256=base_sha256, stats=_informative(e.get("stats"), strings=_STRING_STATS),
                       digests=_digest_map(e.get("digests"), f"{what}: digests", path))


def _check_aliases(tensors: dict[str, TensorEntry], path: Any) -> None:
    """The rules of an alias entry (format_spec.md 4.11), before anything reads a stored byte: ``params`` is
    exactly ``{"target": name}``; the target is another entry, earlier in ``tensors``, not itself an alias (no
    chains, no cycles), of the same shape and dtype, with the same ``base_sha256`` (both absent or equal); the
    alias stores nothing. A violation is a :class:`ManifestError` naming the entry."""
    seen: set[str] = set()
    for name, e in tensors.items():
        if e.codec == ALIAS_CODEC:
            what = f"alias entry {name[:200]!r}"
            target = e.params.get("target")
            if set(e.params) != {"target"} or not isinstance(target, str) or not target:
                raise ManifestError(f"{what}: params must be exactly {{'target': <tensor name>}}, got "
                                    f"{str(e.params)[:80]}", path=path)
            if target == name:
                raise ManifestError(f"{what} names itself as its target", path=path)
            if target not in tensors:
                raise ManifestError(f"{what}: target {target[:200]!r} is not a tensor of the manifest", path=path)
            t = tensors[target]
            if t.codec == ALIAS_CODEC:
                raise ManifestError(f"{what}: target {target[:200]!r} is itself an alias (chains are not allowed)", path=path)
            if target not in seen:
                raise ManifestError(f"{what}: target {target[:200]!r} comes after it in tensors (must come before)", path=path)
            if (e.shape, e.dtype) != (t.shape, t.dtype):
                raise ManifestError(f"{what} is {e.dtype} {e.shape}, its target {target[:200]!r} is {t.dtype} {t.shape}",
                                    path=path)
            if e.base_sha256 != t.base_sha256:
                raise ManifestError(f"{what}: base_sha256 {_short_sha(e.base_sha256)} differs from its target's "
                                    f"{_short_sha(t.base_sha256)} (the base tensors must be identical)", path=path)
            if e.stored or e.digests:
                raise ManifestError(f"{what} stores tensors {sorted(e.stored)[:5]} (an alias stores nothing)", path=path)
        seen.add(name)


def _short_sha(sha: str | None) -> str:
    return "absent" if sha is None else f"{sha[:16]}…"


def _digest_map(value: Any, what: str, path: Any) -> dict[str, str]:
    """``digests`` / ``file_digests``: a JSON object of strings (their syntax is checked by :mod:`.integrity`)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ManifestError(f"{what} must map names to digest strings", path=path)
    return dict(value)


def _base_files(value: Any, files: list[str], path: Any) -> dict[str, str]:
    """``base_files`` (1.2): aux-file names (the ``files`` rule, never the delta's weights, not also in ``files``)
    mapped to digests (syntax checked by :mod:`.integrity`)."""
    out = _digest_map(value, "base_files", path)
    for name in out:
        check_listed_file(name, path=path)
        if is_delta_weights_name(name) or name in files:
            raise ManifestError(f"base_files names {name!r}, which is {'also in files' if name in files else 'a delta weights file'}",
                                path=path)
    return out


def _extra_tensors(extra: Any, path: Any) -> dict[str, dict[str, Any]]:
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise ManifestError("base.extra_tensors must be a JSON object", path=path)
    for name, info in extra.items():
        what = f"base.extra_tensors[{name[:200]!r}]"
        if not name or not isinstance(info, dict):
            raise ManifestError(f"{what} must be a non-empty name mapped to {{dtype, shape, sha256}}", path=path)
        if "shape" in info:
            check_shape(info["shape"], what, path)
        if "dtype" in info and (not isinstance(info["dtype"], str) or info["dtype"] not in NAME_TO_DTYPE):
            raise ManifestError(f"{what}: dtype {str(info['dtype'])[:40]!r} is not a known dtype", path=path)
        if "sha256" in info and (not isinstance(info["sha256"], str) or not _SHA256.fullmatch(info["sha256"])):
            raise ManifestError(f"{what}: sha256 must be 64 lowercase hex digits", path=path)
    return dict(extra)


#: ``stats`` keys whose values are strings; every other ``stats`` / ``totals`` value is a number.
_STRING_STATS = ("auto_choice", "auto_metric")


def _informative(value: Any, depth: int = 0, strings: tuple[str, ...] = ()) -> dict[str, Any]:
    """``totals`` / ``stats``: informative only, so never an error. Keeps finite non-negative numbers
    (no bools), strings under the keys in ``strings``, and nested objects of those; drops the rest."""
    if not isinstance(value, dict) or depth > 3:
        return {}
    out: dict[str, Any] = {}
    for k, v in value.items():
        if isinstance(v, dict):
            out[k] = _informative(v, depth + 1)
        elif k in strings:
            if isinstance(v, str) and len(v) <= 1000:
                out[k] = v
        elif (not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v < 2**63):
            out[k] = v
    return out
