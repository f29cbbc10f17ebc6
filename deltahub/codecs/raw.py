"""Lossless storage: the exact fine-tuned bits, as an XOR against the base or in full, optionally zstd.

``xor`` stores ``bits(finetuned) XOR bits(base)`` (same dtype and shape required): it is exact
and, because sign and exponent bits rarely change, compresses well with zstd, better still
when the bytes are first regrouped into byte planes (``shuffle``, as in blosc). ``full`` stores
the fine-tuned tensor itself, for tensors with no base counterpart or a different shape
(e.g. a resized vocabulary).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from . import register_codec
from ._accel import native
from ._zstd import compress, decompress_frame, stream_frame
from .base import Codec, EncodeInput, Encoded, StoredSpec, check_range, expect_stored, param_choice, param_int
from ..errors import CodecError, InvalidCodecParamsError
from ..format.io import bytes_to_tensor, tensor_bytes

MODES = ("auto", "xor", "full")
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _int_view(t: torch.Tensor) -> torch.Tensor:
    """Same bytes, as a signed integer dtype of the same width (so XOR is defined)."""
    t = t.contiguous()
    return t.view(_INT_OF_SIZE[t.element_size()]) if t.numel() else torch.empty(t.shape, dtype=_INT_OF_SIZE[t.element_size()])


def _shuffle(data: torch.Tensor, itemsize: int) -> torch.Tensor:
    """Byte planes: byte 0 of every element, then byte 1, ... (identity for 1-byte dtypes).

    One strided copy per plane: ~8x faster than a transposed ``contiguous()`` of uint8."""
    if itemsize == 1:
        return data
    src = data.reshape(-1, itemsize)
    out = torch.empty(itemsize, src.shape[0], dtype=torch.uint8)
    for k in range(itemsize):
        out[k] = src[:, k]
    return out.reshape(-1)


def xor_into(f: torch.Tensor, b: torch.Tensor, out: torch.Tensor, start: int, n: int, itemsize: int,
             shuffle: bool) -> None:
    """Elements ``[start, start + m)`` of the ``xor`` payload of an ``n``-element tensor, from their fine-tune
    and base bytes (``f``, ``b``: uint8, ``m * itemsize`` each, aligned), into ``out`` (uint8, ``n * itemsize``):
    as they are, or into their byte planes (``shuffle``, the layout :func:`_shuffle` gives the whole payload).
    Lets a caller build the payload a chunk at a time, without either tensor whole in memory."""
    m = f.numel() // itemsize
    x = (f.view(_INT_OF_SIZE[itemsize]) ^ b.view(_INT_OF_SIZE[itemsize])).view(torch.uint8)
    if not shuffle or itemsize == 1:
        out[start * itemsize:(start + m) * itemsize] = x
        return
    planes, xs = out[:n * itemsize].view(itemsize, n), x.view(m, itemsize)
    for k in range(itemsize):
        planes[k, start:start + m] = xs[:, k]


def _unshuffle(planes: torch.Tensor | np.ndarray, itemsize: int) -> torch.Tensor:
    """Inverse of :func:`_shuffle` (a fresh, writable tensor; ``planes`` may be a read-only array)."""
    if itemsize == 1:
        return planes if isinstance(planes, torch.Tensor) else torch.from_numpy(planes.copy())
    src = np.asarray(planes.numpy() if isinstance(planes, torch.Tensor) else planes).reshape(itemsize, -1)
    nat = native()
    if nat is not None:
        flat = torch.empty(src.size, dtype=torch.uint8)
        nat.unshuffle(flat.numpy(), src, itemsize, False)
        return flat
    out = np.empty((src.shape[1], itemsize), dtype=np.uint8)
    for k in range(itemsize):
        out[:, k] = src[k]
    return torch.from_numpy(out.reshape(-1))


def _frame(stored: dict[str, torch.Tensor], nbytes: int) -> bytes:
    """The ``zstd`` payload decompressed; its frame must declare exactly ``nbytes`` (checked before decompressing)."""
    return decompress_frame(memoryview(stored["zstd"].contiguous().numpy()), what="raw: zstd payload", size=nbytes)


@register_codec
class Raw(Codec):
    """Exact storage; ``mode='auto'`` picks ``xor`` when the base tensor matches in shape and dtype."""

    name = "raw"
    needs_base = False
    default_params: dict[str, Any] = {"mode": "auto", "zstd_level": 1, "shuffle": True}

    def validate_params(self, params: dict[str, Any]) -> dict[str, Any]:
        p = super().validate_params(params)
        if p["mode"] not in MODES:
            raise InvalidCodecParamsError(f"codec 'raw': mode={p['mode']!r} is not one of {', '.join(MODES)}")
        check_range(self.name, "zstd_level", p["zstd_level"], lo=0, hi=22, integer=True)
        if not isinstance(p["shuffle"], bool):
            raise InvalidCodecParamsError(f"codec 'raw': shuffle must be true or false, got {p['shuffle']!r}")
        return p

    def encode(self, inp: EncodeInput, params: dict[str, Any]) -> Encoded:
        ft, base = inp.finetuned, inp.base
        can_xor = base is not None and base.shape == ft.shape and base.dtype == ft.dtype
        mode = params["mode"]
        if mode == "auto":
            mode = "xor" if can_xor else "full"
        if mode == "xor" and not can_xor:
            raise CodecError(
                f"tensor {inp.name!r}: raw mode 'xor' needs a base tensor of the same shape and dtype "
                f"(fine-tune {ft.dtype} {list(ft.shape)}, base {None if base is None else (base.dtype, list(base.shape))})"
            )
        itemsize = ft.element_size()
        if mode == "xor" and inp._xor is not None:  # computed already (compress streams it from the files)
            payload, shuffled = inp._xor
            return self._store(None if shuffled else payload, payload if shuffled else None, mode, params, itemsize)
        payload = _int_view(ft) ^ _int_view(base) if mode == "xor" else ft
        return self._store(tensor_bytes(payload), None, mode, params, itemsize)

    def _store(self, data: torch.Tensor | None, planes: torch.Tensor | None, mode: str, params: dict[str, Any],
               itemsize: int) -> Encoded:
        """The stored tensors of a payload given as its bytes (``data``) or as its byte planes (``planes``)."""
        level = params["zstd_level"]
        if planes is not None and not (params["shuffle"] and level > 0):
            data, planes = _unshuffle(planes, itemsize), None
        nbytes = (data if data is not None else planes).numel()  # type: ignore[union-attr]
        if level > 0 and nbytes:
            if planes is None:
                planes = _shuffle(data, itemsize) if params["shuffle"] else data  # type: ignore[arg-type]
            comp = compress(memoryview(planes.numpy()), level)
            if comp.numel() < nbytes:
                return Encoded({"zstd": comp}, {"mode": mode, "zstd_level": level, "shuffle": params["shuffle"]})
        if data is None:
            data = _unshuffle(planes, itemsize)  # type: ignore[arg-type]
        return Encoded({"data": data}, {"mode": mode, "zstd_level": 0, "shuffle": False})

    def check_decode(self, params: dict[str, Any], stored: Mapping[str, StoredSpec],
                     shape: tuple[int, ...], dtype: torch.dtype) -> None:
        param_choice(self.name, params, "mode", ("xor", "full"))
        level = param_int(self.name, params, "zstd_level", 0, 22)
        param_choice(self.name, params, "shuffle", (True, False))
        nbytes = math.prod(shape) * dtype.itemsize
        if level == 0:
            expect_stored(self.name, stored, {"data": (torch.uint8, (nbytes,))})
        else:
            # One zstd frame, shorter than the payload (else the writer stores "data"); its declared
            # content size must be exactly ``nbytes``, checked before decompressing.
            expect_stored(self.name, stored, {"zstd": (torch.uint8, nbytes)})

    def _payload(self, stored: dict[str, torch.Tensor], params: dict[str, Any], nbytes: int, itemsize: int) -> torch.Tensor:
        if "zstd" in stored:
            raw = _frame(stored, nbytes)
            if params.get("shuffle") and len(raw) == nbytes and nbytes:
                buf = _unshuffle(np.frombuffer(raw, dtype=np.uint8), itemsize)  # the copy makes it writable
            else:
                buf = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        else:
            buf = stored["data"]
        if buf.numel() != nbytes:
            raise CodecError(f"raw: payload has {buf.numel()} bytes, the tensor needs {nbytes}")
        return buf

    def reconstruct(
        self,
        stored: dict[str, torch.Tensor],
        params: dict[str, Any],
        base: torch.Tensor | None,
        shape: tuple[int, ...],
        dtype: torch.dtype,
    ) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        nbytes = n * dtype.itemsize
        buf = self._payload(stored, params, nbytes, dtype.itemsize)
        if params["mode"] == "full":
            return bytes_to_tensor(buf, dtype, tuple(shape))
        if base is None:
            raise CodecError("raw mode 'xor' needs the base tensor to rebuild")
        x = bytes_to_tensor(buf, _INT_OF_SIZE[base.element_size()], tuple(shape))
        return (_int_view(base) ^ x).view(dtype) if n else torch.empty(shape, dtype=dtype)

    def reconstruct_(
        self,
        stored: dict[str, torch.Tensor],
        params: dict[str, Any],
        base: torch.Tensor | None,
        shape: tuple[int, ...],
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """:meth:`reconstruct` into ``base`` (a buffer the caller owns): byte planes are XORed straight into the
        base tensor's bytes by the native kernel as they decompress (no payload copy; a corrupt frame raises with
        ``base`` partly changed); otherwise as :meth:`reconstruct`."""
        nat = native()
        if (nat is None or params.get("mode") != "xor" or not params.get("shuffle") or "zstd" not in stored
                or base is None or base.dtype != dtype or not base.is_contiguous() or base.numel() != math.prod(shape)
                or base.element_size() == 1 or base.numel() == 0):
            return self.reconstruct(stored, params, base, shape, dtype)
        n, its = base.numel(), base.element_size()
        dst, pos = base.view(-1).view(torch.uint8).numpy(), 0
        blob = memoryview(stored["zstd"].contiguous().numpy())
        # Streamed: each decompressed piece (part of a byte plane) XORed into its elements as it comes, so the
        # payload is never whole in memory beside the base.
        for piece in stream_frame(blob, what="raw: zstd payload", size=n * its):
            mv, off = memoryview(piece), 0
            while off < len(mv):
                k, i0 = divmod(pos, n)
                m = min(len(mv) - off, n - i0)
                nat.xor_plane(dst, mv[off:off + m], its, k, i0)
                off, pos = off + m, pos + m
        return base.reshape(shape)

    def decode_delta(self, stored: dict[str, torch.Tensor], params: dict[str, Any], shape: tuple[int, ...]) -> torch.Tensor:
        raise CodecError("raw stores exact tensors; rebuild with reconstruct() and subtract the base for a delta")

    def expected_nbytes(self, shape: tuple[int, ...], params: dict[str, Any]) -> int | None:
        return None
