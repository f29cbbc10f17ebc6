"""Constants of the deltahub on-disk format (see ``format_spec.md``) and the version gate."""

from __future__ import annotations

import torch

from ..errors import UnsupportedFormatError

FORMAT_NAME = "deltahub"
#: Version this code writes. Readers accept any ``1.x``; a higher minor only adds optional fields
#: (1.1: digests of stored tensors, files and the manifest itself, see ``integrity.py``).
FORMAT_VERSION = "1.1"
SUPPORTED_MAJOR = 1

MANIFEST_NAME = "delta_config.json"
WEIGHTS_NAME = "delta.safetensors"
WEIGHTS_INDEX_NAME = "delta.safetensors.index.json"
SHARD_PATTERN = "delta-{index:05d}-of-{total:05d}.safetensors"
#: Delta shards are cut above this many bytes of stored tensors (like transformers' max_shard_size).
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

#: Files of the fine-tune copied verbatim next to the delta so a rebuilt model directory is complete.
AUX_FILE_PATTERNS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "preprocessor_config.json",
)

#: safetensors dtype strings <-> torch dtypes that deltahub reads and writes.
DTYPE_TO_STR: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
STR_TO_DTYPE: dict[str, torch.dtype] = {v: k for k, v in DTYPE_TO_STR.items()}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        STR_TO_DTYPE[_name] = getattr(torch, _attr)
        DTYPE_TO_STR[getattr(torch, _attr)] = _name

#: Manifest dtype names (torch spelling, e.g. "bfloat16") <-> torch dtypes.
def dtype_name(dtype: torch.dtype) -> str:
    """The manifest spelling of a dtype: torch's name without the ``torch.`` prefix."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; raises ``ValueError`` for anything but the canonical name of a
    dtype safetensors can store (not torch's aliases such as ``"float"`` or ``"half"``, nor complex
    or quantized dtypes, nor other ``torch`` attributes such as ``"Tensor"``)."""
    dtype = NAME_TO_DTYPE.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(sorted(NAME_TO_DTYPE))}")
    return dtype


#: Manifest dtype names deltahub reads: the torch spelling of every dtype safetensors can store.
NAME_TO_DTYPE: dict[str, torch.dtype] = {dtype_name(d): d for d in DTYPE_TO_STR}


def parse_version(version: str) -> tuple[int, int]:
    """``"1.0"`` -> ``(1, 0)``; raises ``ValueError`` on anything else."""
    parts = str(version).split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        raise ValueError(f"not a MAJOR.MINOR version: {version!r}")
    return int(parts[0]), int(parts[1])


def check_version(version: object, *, path: str | None = None) -> tuple[int, int]:
    """Refuse a manifest whose major version this reader does not implement."""
    try:
        major, minor = parse_version(str(version))
    except ValueError as exc:
        raise UnsupportedFormatError(f"format_version {version!r} is not MAJOR.MINOR", path=path) from exc
    if major != SUPPORTED_MAJOR:
        raise UnsupportedFormatError(
            f"format_version {version} is not supported by this deltahub (reads {SUPPORTED_MAJOR}.x); "
            "upgrade deltahub to read it",
            path=path,
        )
    return major, minor
