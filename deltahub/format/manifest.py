"""The manifest, ``delta_config.json``: what a delta is, against which base, and how each tensor is coded."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CorruptFileError, ManifestError, MissingFileError, UnsupportedFormatError
from . import integrity
from .spec import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, check_version, dtype_from_name


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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["base_sha256"] is None:
            del d["base_sha256"]
        if not d["stats"]:
            del d["stats"]
        if not d["digests"]:
            del d["digests"]
        return d


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
    created_with: str = ""
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
            "tensors": {k: v.to_dict() for k, v in self.tensors.items()},
        }

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
            base = BaseInfo(
                name_or_path=str(b["name_or_path"]),
                fingerprint=str(b["fingerprint"]),
                revision=b.get("revision"),
                extra_tensors=dict(b.get("extra_tensors") or {}),
            )
            tensors = {}
            for name, e in d["tensors"].items():
                entry = TensorEntry(
                    codec=str(e["codec"]),
                    shape=[int(s) for s in e["shape"]],
                    dtype=str(e["dtype"]),
                    params=dict(e.get("params") or {}),
                    stored={str(k): str(v) for k, v in (e.get("stored") or {}).items()},
                    stored_bytes=int(e.get("stored_bytes", 0)),
                    base_sha256=e.get("base_sha256"),
                    stats=dict(e.get("stats") or {}),
                    digests={str(k): v for k, v in (e.get("digests") or {}).items()},
                )
                dtype_from_name(entry.dtype)
                tensors[str(name)] = entry
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(f"manifest is missing or has a malformed field ({exc!r})", path=path) from None
        return cls(
            base=base,
            tensors=tensors,
            config=d.get("config"),
            finetuned=dict(d.get("finetuned") or {}),
            totals=dict(d.get("totals") or {}),
            files=list(d.get("files") or []),
            file_digests={str(k): v for k, v in (d.get("file_digests") or {}).items()},
            created_with=str(d.get("created_with", "")),
            format=d["format"],
            format_version=str(d["format_version"]),
        )

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        """Read ``delta_config.json`` from a delta directory."""
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise MissingFileError(f"no {MANIFEST_NAME}: not a deltahub delta directory", path=Path(directory))
        raw = path.read_bytes()
        try:
            d = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptFileError(f"manifest is not valid JSON ({exc})", path=path) from None
        manifest = cls.from_dict(d, path=path)
        integrity.verify_manifest_bytes(raw, d, path=path)
        integrity.check_manifest_digests(manifest, d, path=path)
        return manifest
