"""Digests of a delta's bytes (format_spec.md, "Integrity", format 1.1): corruption detection.

Three kinds, all written as self-describing ``"<algorithm>:<lowercase hex>"`` strings (today
always ``sha256``, the fastest standard hash here thanks to SHA-NI, see benchmarks/integrity.md):

* a *tensor digest* per stored tensor (entry key ``digests``, role -> digest): sha256 of the
  line ``DTYPE \\t shape \\n`` followed by the tensor's payload bytes, so a flipped byte in the
  payload or a changed dtype/shape in the safetensors header is caught before decoding;
* a *file digest* per file of ``files`` other than the delta's safetensors files (top-level
  ``file_digests``): sha256 of the file's bytes (tokenizer files, the shard index, ...);
* the *manifest digest* (top-level ``manifest_digest``): sha256 of ``delta_config.json``'s own
  bytes with the digest's hex digits replaced by ``0`` characters.

These detect accidental corruption; they authenticate nothing (anyone can recompute them).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import IntegrityError, ManifestError, MissingFileError, UnsupportedFormatError
from .names import member
from .spec import DTYPE_TO_STR, MANIFEST_NAME, WEIGHTS_NAME, parse_version

if TYPE_CHECKING:
    from .manifest import Manifest

#: The algorithm writers use; readers know exactly the algorithms of ``ALGORITHMS``.
ALGORITHM = "sha256"
#: algorithm -> (hashlib constructor, hex digits of its digest).
ALGORITHMS: dict[str, tuple[Any, int]] = {"sha256": (hashlib.sha256, 64)}
#: First format version whose manifests must carry every digest.
REQUIRED_FROM = (1, 1)

_DIGEST_RE = re.compile(r"([a-z0-9][a-z0-9_-]*):([0-9a-f]+)")
_SHARD_RE = re.compile(r"delta-\d{5}-of-\d{5}\.safetensors")


def is_weights_file(name: str) -> bool:
    """True for the delta's safetensors files (covered by tensor digests, not file digests)."""
    return name == WEIGHTS_NAME or _SHARD_RE.fullmatch(name) is not None


def parse_digest(value: object, *, what: str, path: str | Path | None = None) -> tuple[str, str]:
    """``"sha256:<hex>"`` -> ``("sha256", hex)``. Unknown algorithm: :class:`UnsupportedFormatError`;
    anything else malformed: :class:`ManifestError`."""
    m = _DIGEST_RE.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise ManifestError(f"{what}: digest {value!r} is not '<algorithm>:<lowercase hex>'", path=path)
    alg, hexdigest = m.groups()
    if alg not in ALGORITHMS:
        raise UnsupportedFormatError(
            f"{what}: digest algorithm {alg!r} is not supported by this deltahub (knows {sorted(ALGORITHMS)})", path=path
        )
    if len(hexdigest) != ALGORITHMS[alg][1]:
        raise ManifestError(f"{what}: {alg} digest has {len(hexdigest)} hex digits, expected {ALGORITHMS[alg][1]}", path=path)
    return alg, hexdigest


def _hasher(alg: str = ALGORITHM) -> Any:
    return ALGORITHMS[alg][0]()


def tensor_prefix(dtype: torch.dtype | str, shape: Any) -> bytes:
    """The line hashed before a stored tensor's payload: ``DTYPE \\t shape-as-compact-JSON \\n``."""
    dt = dtype if isinstance(dtype, str) else DTYPE_TO_STR[dtype]
    return f"{dt}\t{json.dumps([int(s) for s in shape], separators=(',', ':'))}\n".encode()


def tensor_digest(dtype: torch.dtype | str, shape: Any, payload: Any, alg: str = ALGORITHM) -> str:
    """Digest of one stored tensor: its dtype and shape line, then its payload bytes (a buffer)."""
    h = _hasher(alg)
    h.update(tensor_prefix(dtype, shape))
    h.update(payload)
    return f"{alg}:{h.hexdigest()}"


def bytes_digest(data: Any, alg: str = ALGORITHM) -> str:
    h = _hasher(alg)
    h.update(data)
    return f"{alg}:{h.hexdigest()}"


def file_digest(path: str | Path, alg: str = ALGORITHM) -> str:
    """Digest of a file's bytes (read in 1 MiB chunks)."""
    h = _hasher(alg)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return f"{alg}:{h.hexdigest()}"


def check_tensor(expected: str, dtype: torch.dtype | str, shape: Any, payload: Any, *, tensor: str, key: str, role: str,
                 path: str | Path) -> None:
    """Raise :class:`IntegrityError` unless the stored tensor's bytes match ``expected``."""
    alg, _ = parse_digest(expected, what=f"tensor {tensor!r} ({role})", path=path)
    got = tensor_digest(dtype, shape, payload, alg)
    if got != expected:
        raise IntegrityError(
            f"stored tensor {key!r} (role {role!r} of tensor {tensor!r}) does not match its digest in {MANIFEST_NAME} "
            f"({got[:23]}… != {expected[:23]}…): the file is corrupt",
            path=path,
        )


def check_file_bytes(data: bytes, name: str, manifest: Manifest, path: str | Path) -> None:
    """Check bytes read from file ``name`` of the delta against its recorded file digest (if any)."""
    expected = manifest.file_digests.get(name)
    if expected is None:
        return
    alg, _ = parse_digest(expected, what=f"file_digests[{name!r}]", path=path)
    got = bytes_digest(data, alg)
    if got != expected:
        raise IntegrityError(
            f"file does not match its digest in {MANIFEST_NAME} ({got[:23]}… != {expected[:23]}…): the file is corrupt", path=path
        )


def verify_aux_file(directory: str | Path, name: str, manifest: Manifest) -> None:
    """Check one file of the delta (a ``files`` entry) against its recorded digest before it is copied.

    :class:`IntegrityError` on a mismatch, :class:`MissingFileError` when a file with a digest
    is absent; files without a recorded digest (format 1.0) pass.
    """
    if name not in manifest.file_digests:
        return
    path = member(directory, name, what=f"file listed in {MANIFEST_NAME}")
    assert path is not None
    expected = manifest.file_digests[name]
    alg, _ = parse_digest(expected, what=f"file_digests[{name!r}]", path=path)
    got = file_digest(path, alg)
    if got != expected:
        raise IntegrityError(
            f"file does not match its digest in {MANIFEST_NAME} ({got[:23]}… != {expected[:23]}…): the file is corrupt", path=path
        )


def verify_aux_files(directory: str | Path, manifest: Manifest) -> None:
    """:func:`verify_aux_file` for every file of ``files`` that is not a delta safetensors file."""
    for name in manifest.files:
        if not is_weights_file(name):
            verify_aux_file(directory, name, manifest)


# --------------------------------------------------------------------------------------------- manifest digest


def _placeholder(alg: str) -> str:
    return f"{alg}:" + "0" * ALGORITHMS[alg][1]


def manifest_bytes(d: dict[str, Any], alg: str = ALGORITHM) -> bytes:
    """Serialize a manifest dict as ``delta_config.json`` bytes with its ``manifest_digest`` filled in.

    The dict is written with ``manifest_digest`` (replacing any old one) set to the zero
    placeholder, the bytes are hashed, and the placeholder's zeros are replaced by the hex digest.
    """
    d = {k: v for k, v in d.items() if k != "manifest_digest"}
    d["manifest_digest"] = _placeholder(alg)
    raw = (json.dumps(d, indent=2) + "\n").encode()
    hexdigest = ALGORITHMS[alg][0](raw).hexdigest()
    at = raw.rindex(_placeholder(alg).encode())  # manifest_digest is the last key: the last occurrence
    token = f"{alg}:{hexdigest}".encode()
    out = raw[:at] + token + raw[at + len(token):]
    if out.count(token) != 1:  # the hex digest also occurs elsewhere: practically impossible
        raise ManifestError("cannot write a manifest_digest: its value occurs elsewhere in the manifest")
    return out


def verify_manifest_bytes(raw: bytes, d: dict[str, Any], *, path: str | Path) -> None:
    """Check ``delta_config.json``'s ``manifest_digest`` against its bytes (nothing to do when absent).

    The value ``<alg>:<hex>`` must occur exactly once in the raw bytes; with its hex digits
    replaced by ``0`` the bytes must hash to ``<hex>``.
    """
    if "manifest_digest" not in d:
        return
    value = d["manifest_digest"]
    alg, hexdigest = parse_digest(value, what="manifest_digest", path=path)
    token = value.encode()
    count = raw.count(token)
    if count != 1:
        raise IntegrityError(
            f"manifest_digest {value[:23]}… occurs {count} times in the file's bytes (must be exactly once): the file is corrupt",
            path=path,
        )
    got = ALGORITHMS[alg][0](raw.replace(token, _placeholder(alg).encode())).hexdigest()
    if got != hexdigest:
        raise IntegrityError(
            f"the manifest does not match its manifest_digest ({alg}:{got[:16]}… != {value[:23]}…): the file is corrupt",
            path=path,
        )


def check_manifest_digests(manifest: Manifest, d: dict[str, Any], *, path: str | Path) -> None:
    """Validate the digest keys of a loaded manifest: known algorithms, well-formed, and, from
    format 1.1 on, present for the manifest, every stored tensor and every non-weights file."""
    try:
        required = parse_version(manifest.format_version) >= REQUIRED_FROM
    except ValueError:
        required = True
    if required and "manifest_digest" not in d:
        raise ManifestError(f"format {manifest.format_version} manifest has no manifest_digest", path=path)
    for name, entry in manifest.tensors.items():
        if (entry.digests or required) and set(entry.digests) != set(entry.stored):
            raise ManifestError(
                f"tensor {name!r}: digests cover roles {sorted(entry.digests)}, stored has {sorted(entry.stored)}", path=path
            )
        for role, value in entry.digests.items():
            parse_digest(value, what=f"tensor {name!r} ({role})", path=path)
    expected_files = {n for n in manifest.files if not is_weights_file(n)}
    if (manifest.file_digests or required) and set(manifest.file_digests) != expected_files:
        raise ManifestError(
            f"file_digests cover {sorted(manifest.file_digests)}, but the files other than delta weights are {sorted(expected_files)}",
            path=path,
        )
    for name, value in manifest.file_digests.items():
        parse_digest(value, what=f"file_digests[{name!r}]", path=path)
    for name, value in manifest.base_files.items():
        parse_digest(value, what=f"base_files[{name!r}]", path=path)


def base_file_sources(base_dir: str | Path, manifest: Manifest, *, strict: bool = True) -> dict[str, Path]:
    """The base's copy of every ``base_files`` entry (format 1.2), each checked against its digest.

    :class:`MissingFileError` when the base folder lacks one, :class:`IntegrityError` when its bytes
    differ (another base, or a changed tokenizer); with ``strict=False`` (the user forces a base that
    failed its check) such files are left out with a warning instead.
    """
    import warnings

    out: dict[str, Path] = {}
    for name, expected in manifest.base_files.items():
        alg, _ = parse_digest(expected, what=f"base_files[{name!r}]", path=base_dir)
        where = f"the delta takes {name} from the base (digest {expected[:23]}…)"
        try:
            path = member(base_dir, name, what="base file")
            assert path is not None
            got = file_digest(path, alg)
            if got != expected:
                raise IntegrityError(f"{where}, but the base's {name} differs ({got[:23]}…): another base or tokenizer",
                                     path=path)
        except (MissingFileError, IntegrityError) as exc:
            if strict:
                if isinstance(exc, MissingFileError):
                    raise MissingFileError(f"{where}, but the base folder has no {name}", path=base_dir) from None
                raise
            warnings.warn(f"{exc}; the rebuilt model will lack {name}", UserWarning, stacklevel=3)
            continue
        out[name] = path
    return out


def describe(manifest: Manifest) -> str:
    """One line for ``deltahub info``: the digest algorithms a delta records, or that it has none."""
    algs = {v.partition(":")[0] for e in manifest.tensors.values() for v in e.digests.values()}
    algs |= {v.partition(":")[0] for v in manifest.file_digests.values()}
    if not algs:
        return f"none (format {manifest.format_version}: no digests recorded)"
    return f"{', '.join(sorted(algs))} (verified on read)"
