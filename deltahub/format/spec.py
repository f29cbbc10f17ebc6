"""Constants of the deltahub on-disk format (see ``format_spec.md``) and the version gate."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import UnsupportedFormatError

if TYPE_CHECKING:
    import torch

FORMAT_NAME = "deltahub"
#: Version this code writes. Readers accept any ``1.x``; a higher minor only adds optional fields
#: (1.1: digests of stored tensors, files and the manifest itself, see ``integrity.py``; 1.2: ``base_files``,
#: aux files taken from the base instead of stored, and the codecs added since; 1.3: ``alias`` entries, a tensor
#: stored under two names coded once).
FORMAT_VERSION = "1.3"
SUPPORTED_MAJOR = 1

#: The ``codec`` of an alias entry (format 1.3): the tensor is byte-identical to another entry's rebuild (tied
#: weights stored under two names), named by ``params["target"]``; it stores nothing. Not a registered codec:
#: readers resolve it at the manifest level (:meth:`deltahub.format.manifest.Manifest.coded`).
ALIAS_CODEC = "alias"

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

#: safetensors dtype strings <-> torch dtypes that deltahub reads and writes. ``DTYPE_TO_STR``,
#: ``STR_TO_DTYPE`` and ``NAME_TO_DTYPE`` (manifest dtype names, torch spelling such as "bfloat16")
#: are built on first access (module ``__getattr__``), so importing this module does not import torch.
_SAFETENSORS_DTYPES = (
    ("float64", "F64"), ("float32", "F32"), ("float16", "F16"), ("bfloat16", "BF16"), ("int64", "I64"),
    ("int32", "I32"), ("int16", "I16"), ("int8", "I8"), ("uint8", "U8"), ("bool", "BOOL"),
    # only where this torch has them
    ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
)
_LAZY_TABLES = ("DTYPE_TO_STR", "STR_TO_DTYPE", "NAME_TO_DTYPE")

if TYPE_CHECKING:
    DTYPE_TO_STR: dict[torch.dtype, str]
    STR_TO_DTYPE: dict[str, torch.dtype]
    NAME_TO_DTYPE: dict[str, torch.dtype]


def _build_tables() -> None:
    import torch

    to_str = {getattr(torch, attr): st for attr, st in _SAFETENSORS_DTYPES if hasattr(torch, attr)}
    g = globals()
    g["DTYPE_TO_STR"] = to_str
    g["STR_TO_DTYPE"] = {v: k for k, v in to_str.items()}
    g["NAME_TO_DTYPE"] = {dtype_name(d): d for d in to_str}


def __getattr__(name: str) -> Any:
    if name in _LAZY_TABLES:
        _build_tables()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """The manifest spelling of a dtype: torch's name without the ``torch.`` prefix."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; raises ``ValueError`` for anything but the canonical name of a
    dtype safetensors can store (not torch's aliases such as ``"float"`` or ``"half"``, nor complex
    or quantized dtypes, nor other ``torch`` attributes such as ``"Tensor"``)."""
    table: dict[str, torch.dtype] = globals().get("NAME_TO_DTYPE") or __getattr__("NAME_TO_DTYPE")
    dtype = table.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(sorted(table))}")
    return dtype


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
