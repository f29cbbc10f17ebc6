"""zstd-compressed stored tensors (format_spec.md, "zstd frames").

A compressed stored tensor is exactly one zstd frame (RFC 8878) whose header records its content
size, with no bytes before or after it. Readers check all three, so every reader decodes a
given file the same way (a multi-frame or trailing-garbage blob would otherwise decode to the
first frame in some libraries and to the concatenation in others), and the declared size bounds
the allocation before anything is decompressed.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator

import torch
import zstandard

from ..errors import CodecError


def compress(data: bytes | memoryview, level: int) -> torch.Tensor:
    """One zstd frame, content size and content checksum recorded (format 1.1), as a uint8 tensor.

    The checksum (the frame's last 4 bytes) is verified by the decompressor whenever the frame
    header's Content_Checksum_flag is set; frames without it (format 1.0) stay readable.
    """
    blob = _compressor(level).compress(data)
    if len(blob) < ZERO_COPY_MIN:
        return torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return _bytes_tensor(blob)


#: Frames at least this large become tensors over their own bytes (:func:`_bytes_tensor`), not a copy.
ZERO_COPY_MIN = 1 << 20


def _bytes_tensor(blob: bytes) -> torch.Tensor:
    """A uint8 tensor over the bytes of ``blob`` itself (kept alive by the tensor), so a large frame never exists
    twice. ``torch.frombuffer`` wants a writable buffer (and a warnings filter is process-wide, not safe to
    change from compress's worker threads), so the tensor views a ctypes array at the bytes' address that holds
    the reference; stored tensors are only ever read."""
    arr = (ctypes.c_ubyte * len(blob)).from_address(ctypes.cast(ctypes.c_char_p(blob), ctypes.c_void_p).value or 0)
    arr._owner = blob  # type: ignore[attr-defined]
    return torch.frombuffer(arr, dtype=torch.uint8)


_LOCAL = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's compressor for ``level`` (a compressor is not shared between threads; making one per call
    cost more than compressing a small code stream)."""
    cache = getattr(_LOCAL, "compressors", None)
    if cache is None:
        cache = _LOCAL.compressors = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=True)
    return c


#: Compressed bytes fed to the decompressor at a time by :func:`stream_frame`.
STREAM_IN = 1 << 18


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor (a decompressor is not shared between threads; making one per frame allocated
    and cleared its context for every stored stream)."""
    d = getattr(_LOCAL, "decompressor", None)
    if d is None:
        d = _LOCAL.decompressor = zstandard.ZstdDecompressor()
    return d


def stream_frame(blob: memoryview, *, what: str, size: int) -> Iterator[bytes]:
    """The content of a single zstd frame that declares ``size`` bytes, in pieces as it decompresses (the
    checks of :func:`decompress_frame`; a failure raises :class:`CodecError` after the pieces before it)."""
    try:
        declared = zstandard.frame_content_size(blob)
    except zstandard.ZstdError as exc:
        raise CodecError(f"{what}: not a zstd frame ({exc})") from None
    if declared != size:
        raise CodecError(f"{what}: the zstd frame does not record its content size" if declared < 0
                         else f"{what}: zstd frame holds {declared} bytes, expected {size}")
    obj = zstandard.ZstdDecompressor().decompressobj()  # its own context: a suspended stream never shares one
    out = fed = 0
    try:
        for a in range(0, len(blob), STREAM_IN):
            if obj.eof:
                break
            chunk = blob[a:a + STREAM_IN]
            fed = a + len(chunk)
            piece = obj.decompress(chunk)
            out += len(piece)
            if out > size:
                raise CodecError(f"{what}: zstd frame decompresses to more than its header's {size} bytes")
            if piece:
                yield piece
        if not obj.eof:
            raise zstandard.ZstdError("did not decompress full frame")
        unused = len(obj.unused_data) + len(blob) - fed
        if unused:
            raise zstandard.ZstdError(f"{unused} bytes after the frame")
    except zstandard.ZstdError as exc:
        raise CodecError(f"{what}: corrupt zstd frame ({exc})") from None
    if out != size:
        raise CodecError(f"{what}: zstd frame decompressed to {out} bytes, its header says {size}")


def decompress_frame(blob: bytes | memoryview, *, what: str, size: int | None = None, max_size: int | None = None) -> bytes:
    """The content of a single zstd frame; :class:`CodecError` unless it is exactly one frame that
    declares its content size (equal to ``size`` / at most ``max_size`` when given)."""
    try:
        declared = zstandard.frame_content_size(blob)
    except zstandard.ZstdError as exc:
        raise CodecError(f"{what}: not a zstd frame ({exc})") from None
    if declared < 0:
        raise CodecError(f"{what}: the zstd frame does not record its content size")
    if size is not None and declared != size:
        raise CodecError(f"{what}: zstd frame holds {declared} bytes, expected {size}")
    if max_size is not None and declared > max_size:
        raise CodecError(f"{what}: zstd frame holds {declared} bytes, more than the {max_size} possible")
    dec = _decompressor()
    try:
        try:
            out = dec.decompress(blob, allow_extra_data=False)
        except TypeError:  # zstandard < 0.23 has no allow_extra_data
            obj = dec.decompressobj()
            out = obj.decompress(blob)
            if not obj.eof:
                raise zstandard.ZstdError("did not decompress full frame") from None
            if obj.unused_data:
                raise zstandard.ZstdError(f"{len(obj.unused_data)} bytes after the frame") from None
    except zstandard.ZstdError as exc:
        raise CodecError(f"{what}: corrupt zstd frame ({exc})") from None
    if len(out) != declared:
        raise CodecError(f"{what}: zstd frame decompressed to {len(out)} bytes, its header says {declared}")
    return out
