"""format_spec.md's test vectors and worked examples, parsed out of the spec itself, and the spec's size formulas
checked against the bytes a delta file really holds, so that the spec and the code cannot drift apart.

Blocks are the fenced blocks that follow a ``<!-- test-vectors: NAME -->`` line in format_spec.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from deltahub.codecs import EncodeInput, get_codec
from deltahub.codecs._masks import bitmap_nbytes, encode_mask
from deltahub.codecs._quant import packed_nbytes
from deltahub.codecs._rng import (group_keep_mask, hash32_int, keep_mask, keep_threshold, name_stream, uniform_u32,
                                  uniform_u32_at, stream_keys)
from deltahub.codecs._zstd import decompress_frame
from deltahub.codecs.base import matrix_view_shape
from deltahub.codecs.deltadq import PRESETS, auto_candidates, keep_count
from deltahub.codecs.rowsparse import max_nbytes
from deltahub.codecs.topk_ternary import kept_count
from deltahub.format.delta_files import DeltaShardWriter
from deltahub.format.spec import WEIGHTS_NAME

from test_codecs_deltadq import ref_group_mask, ref_stream
from test_rng_masks import ref_h, ref_u

pytestmark = pytest.mark.usefixtures("decode_impl")  # native kernels and numpy paths alike

SPEC = Path(__file__).resolve().parents[1] / "format_spec.md"
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8}


def spec_block(name: str) -> list[str]:
    """Lines of the fenced block right after ``<!-- test-vectors: name -->``."""
    m = re.search(rf"<!-- test-vectors: {re.escape(name)} -->\s*```[a-z]*\n(.*?)\n```", SPEC.read_text(encoding="utf-8"),
                  re.DOTALL)
    assert m, f"format_spec.md has no test-vectors block {name!r}"
    return m.group(1).splitlines()


def example(name: str) -> dict[str, list[str]]:
    """An example block as ``key -> lines``: a line starting with a key, plus its indented continuation lines."""
    out: dict[str, list[str]] = {}
    key = None
    for line in spec_block(name):
        if line[:1].isspace():
            assert key is not None
            out[key].append(line.strip())
        else:
            key, _, rest = line.partition(" ")
            assert key not in out, f"{name}: {key} given twice"
            out[key] = [rest.strip()]
    return out


def matrix(lines: list[str], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor([[float(x) for x in line.split()] for line in lines], dtype=dtype)


def stored(line: str) -> tuple[torch.dtype, tuple[int, ...], bytes]:
    """``DTYPE [shape] hex...`` -> (dtype, shape, raw bytes)."""
    m = re.fullmatch(r"(F32|F16|BF16|U8) \[([\d, ]*)\]\s+([0-9a-fA-F ]*)", line)
    assert m, f"cannot parse stored tensor {line!r}"
    shape = tuple(int(s) for s in m.group(2).replace(" ", "").split(",") if s)
    return DTYPES[m.group(1)], shape, bytes.fromhex(m.group(3))


def as_tensor(dtype: torch.dtype, shape: tuple[int, ...], raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape).clone() if raw else \
        torch.zeros(shape, dtype=dtype)


def tensor_line(ex: dict[str, list[str]]) -> tuple[str, tuple[int, ...]]:
    name, shape = re.fullmatch(r"(\S+) \[([\d, ]+)\]", ex["tensor"][0]).groups()
    return name, tuple(int(s) for s in shape.split(","))


# --- 3.5 Seeded masks ---------------------------------------------------------------------------------
def _args(text: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)=("[^"]*"|\S+)', text))


def _int(s: str) -> int:
    return int(s, 0)


def _bits(s: str) -> list[list[int]]:
    return [[int(ch) for ch in row] for row in s.split()]


def test_seeded_mask_vectors() -> None:
    seen = set()
    for line in spec_block("seeded-masks"):
        lhs, rhs = line.rsplit(" = ", 1)  # the arguments have '=' signs of their own
        kind, args = lhs.split(None, 1)
        a, rhs = _args(args), rhs.strip()
        seen.add(kind)
        if kind == "H":
            x = _int(a["x"])
            assert hash32_int(x) == ref_h(x) == int(rhs, 16), line
        elif kind == "stream":
            name = json.loads(a["name"])
            expect = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:4], "little")
            assert name_stream(name) == expect == int(rhs, 16), line
        elif kind == "keys":
            k1, k2 = (int(w, 16) for w in rhs.split())
            seed, stream = _int(a["seed"]), _int(a["stream"])
            assert stream_keys(seed, stream) == (k1, k2), line
            assert ref_h(seed ^ 0x9E3779B9) == k1 and ref_h(k1 ^ stream) == k2, line
        elif kind == "u32":
            seed, stream, spec_i = _int(a["seed"]), _int(a["stream"]), a["i"]
            if ".." in spec_i:
                lo, hi = (int(v) for v in spec_i.split(".."))
                idx = list(range(lo, hi + 1))
                assert uniform_u32(seed, stream, len(idx), lo).tolist() == [int(w, 16) for w in rhs.split()], line
            else:
                idx = [int(v) for v in spec_i.split(",")]
            expect = [int(w, 16) for w in rhs.split()]
            assert uniform_u32_at(seed, stream, torch.tensor(idx, dtype=torch.int64)).tolist() == expect, line
            assert [ref_u(seed, stream, i) for i in idx] == expect, line
        elif kind == "threshold":
            p = float(a["p"])
            assert keep_threshold(p) == math.floor((1.0 - p) * 2**32) == int(rhs, 16), line
        elif kind == "keep":
            p, g = float(a["p"]), int(a["g"])
            assert keep_count(p, g) == math.floor((1.0 - p) * g + 0.5) == int(rhs), line
        elif kind == "bernoulli":
            seed, stream, p = _int(a["seed"]), _int(a["stream"]), float(a["p"])
            rows, cols = int(a["rows"]), int(a["cols"])
            expect = _bits(rhs)
            assert keep_mask(seed, stream, (rows, cols), p).int().tolist() == expect, line
            t = math.floor((1.0 - p) * 2**32)
            ref = [[int(ref_u(seed, stream, r * cols + c) < t) for c in range(cols)] for r in range(rows)]
            assert ref == expect, line
        elif kind == "group":
            seed, stream, p = _int(a["seed"]), _int(a["stream"]), float(a["p"])
            rows, cols, g = int(a["rows"]), int(a["cols"]), int(a["g"])
            keep = keep_count(p, g)
            expect = _bits(rhs)
            assert group_keep_mask(seed, stream, rows, cols, g, keep).int().tolist() == expect, line
            assert ref_group_mask(seed, stream, rows, cols, g, keep).astype(int).tolist() == expect, line
            assert all(sum(row[j:j + g]) == keep for row in expect for j in range(0, cols, g)), line
        else:
            raise AssertionError(f"unknown vector kind in format_spec.md: {line!r}")
    assert seen == {"H", "stream", "keys", "u32", "threshold", "keep", "bernoulli", "group"}


# --- 6. Worked examples ----------------------------------------------------------------------------------
def _check_stored(ex: dict[str, list[str]], roles: list[str], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's stored tensors are exactly the spec's (roles, dtypes, shapes, bytes); returns the spec's."""
    assert set(tensors) == set(roles)
    spec_tensors = {}
    for role in roles:
        dtype, shape, raw = stored(ex[role][0])
        t = tensors[role]
        assert (t.dtype, tuple(t.shape)) == (dtype, shape), role
        assert t.contiguous().view(torch.uint8).numpy().tobytes() == raw, role
        spec_tensors[role] = as_tensor(dtype, shape, raw)
    return spec_tensors


def _encode(codec_name: str, ex: dict[str, list[str]], extra: dict | None = None):
    name, shape = tensor_line(ex)
    delta = matrix(ex["delta"]).reshape(shape)
    params = json.loads(ex["params"][0])
    codec = get_codec(codec_name)
    base = torch.zeros(shape)
    enc = codec.encode(EncodeInput(name, base + delta, base), codec.validate_params({**(extra or {}), **params}))
    assert enc.params == params
    if "stream" in params:
        assert params["stream"] == name_stream(name)
    return codec, enc, params, shape


def test_deltadq_worked_example() -> None:
    ex = example("deltadq-example")
    codec, enc, prm, shape = _encode("deltadq", ex, {"preset": None})
    rows, cols = shape
    kept = matrix(ex["kept"]).bool()
    keep = keep_count(prm["p"], prm["group_size"])
    assert torch.equal(group_keep_mask(prm["seed"], prm["stream"], rows, cols, prm["group_size"], keep), kept)
    spec_tensors = _check_stored(ex, ["codebook", "part", "low0", "low1"], enc.tensors)
    decoded = matrix(ex["decoded"])
    assert torch.equal(codec.decode_delta(spec_tensors, prm, shape), decoded)
    assert torch.equal(codec.decode_delta(enc.tensors, prm, shape), decoded)
    assert enc.nbytes == 19


def test_dare_worked_example() -> None:
    ex = example("dare-example")
    codec, enc, prm, shape = _encode("dare", ex)
    kept = matrix(ex["kept"]).bool()
    assert torch.equal(keep_mask(prm["seed"], prm["stream"], shape, prm["p"]), kept)
    spec_tensors = _check_stored(ex, ["values", "norm"], enc.tensors)
    decoded = matrix(ex["decoded"])
    assert torch.equal(codec.decode_delta(spec_tensors, prm, shape), decoded)
    assert codec.expected_nbytes(shape, prm) == enc.nbytes == 2 * int(kept.sum()) + 4


def test_topk_worked_example() -> None:
    ex = example("topk-ternary-example")
    codec, enc, prm, shape = _encode("topk-ternary", ex)
    spec_tensors = _check_stored(ex, ["mask", "sign", "scale"], enc.tensors)
    decoded = matrix(ex["decoded"])
    assert torch.equal(codec.decode_delta(spec_tensors, prm, shape), decoded)
    # the indices form of the same mask: its zstd content is the spec's byte planes, and auto picks the bitmap
    mask = decoded != 0
    used, blob = encode_mask(mask, "indices")
    assert decompress_frame(blob.numpy().tobytes(), what="test") == bytes.fromhex(ex["indices"][0])
    assert encode_mask(mask, "auto")[0] == "bitmap"
    auto = codec.encode(EncodeInput("t", matrix(ex["delta"]), torch.zeros(shape)),
                        codec.validate_params({"density": prm["density"]}))
    assert auto.params["mask_encoding"] == "bitmap"


def ref_rowsparse(params: dict, mask: bytes, codes: bytes, scale: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """4.7's decoder written from the spec alone (bitmap mask, raw code stream), in numpy float32."""
    base_rows, k, g = params["base_rows"], params["bits"], params["group_size"]
    kept = [r for r in range(base_rows) if mask[r // 8] >> (r % 8) & 1]
    assert len(kept) == int(params["density"] * base_rows + 0.5)
    top = 2**k - 1
    out = np.zeros((base_rows, cols), dtype=np.float32)
    for j, r in enumerate(kept):
        for c in range(cols):
            i = j * cols + c
            code = sum(((codes[(i * k + b) // 8] >> ((i * k + b) % 8)) & 1) << b for b in range(k))
            s = scale[j] if g is None else scale[j, c // g]
            out[r, c] = np.float32(s) * np.float32(2 * code - top)
    return out


@pytest.mark.parametrize("block", ["rowsparse-example", "rowsparse-group-example"])
def test_rowsparse_worked_examples(block: str) -> None:
    ex = example(block)
    name, shape = tensor_line(ex)
    rows, cols = shape
    base_shape = tuple(int(v) for v in ex["base"][0].strip("[]").split(","))
    params = json.loads(ex["params"][0])
    base = torch.zeros(base_shape)
    ft = torch.cat([base + matrix(ex["delta"]), matrix(ex["new"])]) if "new" in ex else base + matrix(ex["delta"])
    codec = get_codec("rowsparse")
    enc = codec.encode(EncodeInput(name, ft, base), codec.validate_params(
        {k: v for k, v in params.items() if k != "base_rows"}))
    assert enc.params == params
    roles = ["mask", "codes", "scale"] + (["new_rows"] if "new" in ex else [])
    spec_tensors = _check_stored(ex, roles, enc.tensors)
    rebuilt = matrix(ex["rebuilt"])
    codec.check_decode(params, {r: (t.dtype, tuple(t.shape)) for r, t in spec_tensors.items()}, shape, torch.float32)
    assert torch.equal(codec.reconstruct(spec_tensors, params, base, shape, torch.float32), rebuilt)
    ref = ref_rowsparse(params, stored(ex["mask"][0])[2], stored(ex["codes"][0])[2],
                        spec_tensors["scale"].numpy(), rows, cols)
    assert np.array_equal(ref, rebuilt[:base_shape[0]].numpy())
    added = rows - params["base_rows"]
    assert codec.expected_nbytes(shape, params) == (None if added else enc.nbytes)
    assert max_nbytes(shape, params, itemsize=4) == enc.nbytes


def test_preset_table_matches_code() -> None:
    rows = re.findall(r"^\| `(\d+x)` \| ([\d.]+) \| 1/(\d+) \| (\d+) \| (\d+) \| (\w+) \| ([\d.]+) \| (\d+) \|$",
                      SPEC.read_text(encoding="utf-8"), re.MULTILINE)
    assert [r[0] for r in rows] == list(PRESETS)
    for name, p, inv_kept, bits, parts, quantizer, bpw, smallest in rows:
        pre = PRESETS[name]
        assert (pre["p"], pre["bits"], pre["parts"], pre["quantizer"]) == (float(p), int(bits), int(parts), quantizer)
        assert 1 - pre["p"] == 1 / int(inv_kept) and pre["bits"] * (1 - pre["p"]) == float(bpw)
        assert 16 / float(bpw) == float(name.rstrip("x"))
        assert auto_candidates(4096, pre["p"])[0] == int(smallest)


# --- 4.4-4.6 sizes: bytes in a written delta file against the spec's formulas ---------------------------
def on_disk_sizes(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, list[int], int]]:
    """Write the stored tensors with the delta writer; read back role -> (dtype, shape, payload bytes) from the header."""
    writer = DeltaShardWriter(tmp_path)
    writer.add({f"w.{role}": t for role, t in tensors.items()}, "test")
    assert writer.finish() == [WEIGHTS_NAME]
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + hlen])
    out = {}
    for key, info in header.items():
        if key != "__metadata__":
            lo, hi = info["data_offsets"]
            out[key.removeprefix("w.")] = (info["dtype"], info["shape"], hi - lo)
    assert sum(n for *_, n in out.values()) == len(data) - 8 - hlen
    return out


def heavy_delta(rows: int, cols: int, seed: int) -> EncodeInput:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g) * 0.02
    d = torch.randn(rows, cols, generator=g) * torch.randn(rows, cols, generator=g).abs() * 1e-3  # heavy-tailed
    return EncodeInput("model.layers.3.self_attn.o_proj.weight", base + d, base)


@pytest.mark.parametrize("params", [
    {"preset": "16x"}, {"preset": "64x"}, {"preset": "512x"},
    {"preset": None, "p": 0.75, "bits": 3, "parts": 2, "quantizer": "uniform", "qgroup": 48, "group_size": 8,
     "entropy": "none"},
    {"preset": None, "p": 0.5, "bits": 2, "parts": 4, "group_size": 16, "entropy": "none"},
    {"preset": None, "p": 0.875, "bits": 4, "parts": 1, "group_size": 32, "entropy": "none"},
])
def test_deltadq_bytes_on_disk_match_spec(tmp_path: Path, params: dict) -> None:
    rows, cols = 48, 256
    inp = heavy_delta(rows, cols, seed=len(json.dumps(params)))
    codec = get_codec("deltadq")
    enc = codec.encode(inp, codec.validate_params(params))
    prm = enc.params
    p, k, m, g = prm["p"], prm["bits"], prm["parts"], prm["group_size"]
    keep = keep_count(p, g)
    n = rows * (cols // g) * keep
    a = m.bit_length() - 1
    b = k - a
    uniform = prm["quantizer"] == "uniform"
    disk = on_disk_sizes(tmp_path, enc.tensors)
    # roles, dtypes and shapes of the spec's table
    roles = {"norm", "qmin", "qstep"} if uniform else {"codebook"}
    roles |= {"part"} if m > 1 else set()
    roles |= {f"low{j}" for j in range(m)} if b > 0 else set()
    assert set(disk) == roles
    if uniform:
        ng = math.ceil(n / prm["qgroup"])
        assert disk["norm"][:2] == ("F32", [1]) and disk["qmin"][:2] == disk["qstep"][:2] == ("F16", [ng])
        side = 4 + 4 * ng
    else:
        assert disk["codebook"][:2] == ("F32", [2**k])
        side = 4 * 2**k
    assert disk.get("codebook", disk.get("norm"))[2] + sum(disk[r][2] for r in ("qmin", "qstep") if r in disk) == side
    # stream sizes: R(count, bits), or less when zstd'ed; equal without entropy coding
    part = np.array(ref_stream(enc.tensors["part"], n, a), dtype=np.int64) if a else np.zeros(n, dtype=np.int64)
    counts = [int((part == j).sum()) for j in range(m)]
    streams = {"part": (n, a)} if a else {}
    streams |= {f"low{j}": (counts[j], b) for j in range(m)} if b else {}
    for role, (cnt, bits) in streams.items():
        assert disk[role][0] == "U8" and len(disk[role][1]) == 1
        raw = packed_nbytes(cnt, bits)
        assert disk[role][2] == raw if prm["entropy"] == "none" else disk[role][2] <= raw
    total = sum(nb for *_, nb in disk.values())
    exact = side + packed_nbytes(n, a) + sum(packed_nbytes(c, b) for c in counts)
    assert total == enc.nbytes
    assert total == exact if prm["entropy"] == "none" else total <= exact
    assert exact <= side + packed_nbytes(n, a) + packed_nbytes(n, b) + m - 1
    if m == 1 and prm["entropy"] == "none":
        assert total == side + packed_nbytes(n, k) == codec.expected_nbytes((rows, cols), prm)
    numel = rows * cols
    assert 8 * total / numel <= k * keep / g + 8 * (side + m + 1) / numel
    if "preset" in params and params["preset"]:
        assert keep / g == 1 - p  # auto picks a power of two with a whole keep count
        nominal = 16 / float(params["preset"].rstrip("x"))
        assert k * (1 - p) == nominal
        assert 8 * total / numel <= nominal + 8 * (side + m + 1) / numel


@pytest.mark.parametrize("p,dtype", [(0.9, "float16"), (0.5, "bfloat16")])
def test_dare_bytes_on_disk_match_spec(tmp_path: Path, p: float, dtype: str) -> None:
    rows, cols = 32, 64
    inp = heavy_delta(rows, cols, seed=3)
    codec = get_codec("dare")
    enc = codec.encode(inp, codec.validate_params({"p": p, "dtype": dtype, "seed": 9}))
    disk = on_disk_sizes(tmp_path, enc.tensors)
    t = math.floor((1.0 - p) * 2**32)
    n = sum(ref_u(9, enc.params["stream"], i) < t for i in range(rows * cols))
    assert disk == {"values": ({"float16": "F16", "bfloat16": "BF16"}[dtype], [n], 2 * n), "norm": ("F32", [1], 4)}
    assert codec.expected_nbytes((rows, cols), enc.params) == 2 * n + 4
    numel = rows * cols
    mean = numel * t / 2**32  # E[N]: bits per weight about 16 (1 - p)
    assert abs(n - mean) <= 5 * math.sqrt(numel * p * (1 - p))
    assert abs(8 * (2 * n + 4) / numel - (16 * (1 - p) + 32 / numel)) <= 16 * 5 * math.sqrt(p * (1 - p) / numel)


@pytest.mark.parametrize("shape,density,encoding", [
    ((4, 64, 48), 0.1, "bitmap"), ((4, 64, 48), 0.3, "auto"), ((4, 64, 48), 0.003, "indices"),
    ((8, 128, 200), 0.003, "auto"),  # 3-D tensors: matrix views [256, 48] and [1024, 200]
])
def test_topk_bytes_on_disk_match_spec(tmp_path: Path, shape: tuple[int, ...], density: float, encoding: str) -> None:
    rows, cols = matrix_view_shape(shape)
    inp = heavy_delta(rows, cols, seed=4)
    inp = EncodeInput(inp.name, inp.finetuned.reshape(shape), inp.base.reshape(shape))
    codec = get_codec("topk-ternary")
    enc = codec.encode(inp, codec.validate_params({"density": density, "mask_encoding": encoding}))
    k = kept_count(density, rows * cols)
    assert k == math.floor(density * rows * cols + 0.5)
    disk = on_disk_sizes(tmp_path, enc.tensors)
    assert disk["sign"] == ("U8", [math.ceil(k / 8)], math.ceil(k / 8)) and disk["scale"] == ("F32", [1], 4)
    bitmap = rows * math.ceil(cols / 8)
    used = enc.params["mask_encoding"]
    assert used == (encoding if encoding != "auto" else used)
    if used == "bitmap":
        assert disk["mask"] == ("U8", [rows, math.ceil(cols / 8)], bitmap) and bitmap == bitmap_nbytes(rows, cols)
    else:
        assert disk["mask"][:2] == ("U8", [disk["mask"][2]])
        if encoding == "auto":
            assert disk["mask"][2] < bitmap
    total = sum(nb for *_, nb in disk.values())
    if encoding == "auto":
        assert total <= bitmap + math.ceil(k / 8) + 4
        if density < 0.01:  # sparse: indices, about density * (log2(1/density) + 2.5) bits per weight
            assert used == "indices"
            assert 8 * total / (rows * cols) <= density * (math.log2(1 / density) + 2.5) * 1.25


def ref_low_rank_product(u: np.ndarray, s: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """4.8's low-rank product written from the spec alone: ``A = float32(u * s)`` per element, then the exact
    sum (float64: exact for the examples' products), and 4.8's tolerance ``r 2^-23 sum |A V|`` around it."""
    a = (u.astype(np.float32) * s.astype(np.float32)[None, :]).astype(np.float32)
    exact = a.astype(np.float64) @ v.astype(np.float64)
    tol = u.shape[1] * 2.0**-23 * (np.abs(a.astype(np.float64)) @ np.abs(v.astype(np.float64)))
    return exact, tol


def ref_uniform_run(codes: bytes, offset: int, n: int, k: int, qmin: np.ndarray, qstep: np.ndarray, norm: float,
                    q: int) -> np.ndarray:
    """3.7's ``uniform`` dequantization of one run of ``n`` ``k``-bit codes starting at byte ``offset`` (3.3)."""
    out = np.zeros(n, dtype=np.float32)
    for i in range(n):
        c = sum(((codes[offset + (i * k + b) // 8] >> ((i * k + b) % 8)) & 1) << b for b in range(k))
        step = np.float32(qstep[i // q]) * np.float32(c)
        out[i] = (np.float32(qmin[i // q]) + step) * np.float32(norm)
    return out


def _ref_lowrank_mp(params: dict, t: dict[str, torch.Tensor], rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    q, byte, group, run = params["qgroup"], 0, 0, 0
    us, vs = [], []
    codes = t["codes"].numpy().tobytes()
    for n, k in params["bands"]:
        for length, sink in ((rows, us), (cols, vs)):
            count = n * length
            g = -(-count // q)
            vals = ref_uniform_run(codes, byte, count, k, t["qmin"].numpy()[group:group + g],
                                   t["qstep"].numpy()[group:group + g], float(t["norm"][run]), q)
            sink.append(vals.reshape(n, length))
            byte, group, run = byte + -(-count * k // 8), group + g, run + 1
    return ref_low_rank_product(np.concatenate(us).T, t["s"].numpy(), np.concatenate(vs))


@pytest.mark.parametrize("block, codec_name, roles", [
    ("lowrank-example", "lowrank", ["u", "s", "vh"]),
    ("lowrank-mp-example", "lowrank-mp", ["s", "codes", "qmin", "qstep", "norm"]),
    ("lowrank-residual-example", "lowrank-residual", ["u", "s", "vh", "sign", "scale"]),
])
def test_lowrank_worked_examples(block: str, codec_name: str, roles: list[str]) -> None:
    """Decoding the spec's bytes gives the spec's values, bit for bit in deltahub and, from the spec alone, within
    4.8's tolerance of the exact product (which these examples make exact); the encoder rebuilds the delta."""
    ex = example(block)
    name, shape = tensor_line(ex)
    rows, cols = shape
    params = json.loads(ex["params"][0])
    codec = get_codec(codec_name)
    t = {r: as_tensor(*stored(ex[r][0])) for r in roles}
    codec.check_decode(params, {r: (x.dtype, tuple(x.shape)) for r, x in t.items()}, shape, torch.float32)
    decoded = matrix(ex["decoded"])
    assert torch.equal(codec.decode_delta(t, params, shape), decoded)
    assert codec.expected_nbytes(shape, params) == sum(x.numel() * x.element_size() for x in t.values())
    if codec_name == "lowrank-mp":
        exact, tol = _ref_lowrank_mp(params, t, rows, cols)
    else:
        exact, tol = ref_low_rank_product(t["u"].float().numpy(), t["s"].numpy(), t["vh"].float().numpy())
    if codec_name == "lowrank-residual":
        bits = np.unpackbits(t["sign"].numpy(), axis=1, bitorder="little")[:, :cols].astype(bool)
        sc = t["scale"].numpy()[:, None].astype(np.float64)
        exact = exact + np.where(bits, sc, -sc)
    assert np.all(np.abs(exact - decoded.numpy()) <= tol) and np.array_equal(exact.astype(np.float32), decoded.numpy())
    # the writer, on the decoded delta, reproduces it (up to its SVD's float32 rounding and the 2-bit band's grid)
    enc = codec.encode(EncodeInput(name, decoded.clone(), torch.zeros(shape)), codec.validate_params(
        {**params, **({"qgroup": 4} if codec_name == "lowrank-mp" else {})}))
    assert enc.params == params
    again = codec.decode_delta(enc.tensors, enc.params, shape)
    assert torch.allclose(again, decoded, atol=1e-3 if codec_name == "lowrank-mp" else 1e-5)


# --- 4.11 alias ----------------------------------------------------------------------------------------------
ALIAS_STORED = {"model.embed_tokens.weight.sign": ("U8", [2, 2], "ad010000"),
                "model.embed_tokens.weight.scale": ("F32", [2], "6666e63e0000003f")}  # 6.1's bytes


def _alias_delta(root: Path, tensors: dict) -> tuple[Path, Path]:
    """A delta directory whose manifest has the ``tensors`` entries (6.9's, or a broken copy) and 6.1's stored
    tensors, and its all-zero float32 base holding every entry name; written with plain json / safetensors."""
    from safetensors.numpy import save_file

    from deltahub.format.integrity import manifest_bytes

    root.mkdir(parents=True, exist_ok=True)
    base_names = {n for n, e in tensors.items() if "base_sha256" in e}
    base = {n: np.zeros((2, 10), dtype=np.float32) for n in base_names}
    save_file(base, str(root / "base.safetensors"))
    lines = "".join(f"{n}\tF32\t[2,10]\t{hashlib.sha256(bytes(80)).hexdigest()}\n" for n in sorted(base_names, key=str.encode))
    (root / "delta").mkdir()
    save_file({k: np.frombuffer(bytes.fromhex(h), dtype={"U8": np.uint8, "F32": np.float32}[d]).reshape(s)
               for k, (d, s, h) in ALIAS_STORED.items()}, str(root / "delta" / "delta.safetensors"))
    manifest = {"format": "deltahub", "format_version": "1.3", "created_with": "test",
                "base": {"name_or_path": "base", "revision": None, "extra_tensors": {},
                         "fingerprint": "sha256:" + hashlib.sha256(lines.encode()).hexdigest()},
                "finetuned": {"name_or_path": "ft", "revision": None}, "config": None, "totals": {},
                "files": ["delta.safetensors"], "file_digests": {}, "tensors": tensors}
    (root / "delta" / "delta_config.json").write_bytes(manifest_bytes(manifest))
    return root / "delta", root / "base.safetensors"


def _ref_rebuild(delta_dir: Path, base_file: Path) -> dict[str, np.ndarray]:
    """An independent reader of 6.9's delta, from the spec alone: bitdelta (row scales, 4.1) and alias (4.11)."""
    from safetensors.numpy import load_file

    m = json.loads((delta_dir / "delta_config.json").read_text())
    stored, base = load_file(str(delta_dir / "delta.safetensors")), load_file(str(base_file))
    out: dict[str, np.ndarray] = {}
    for name, e in m["tensors"].items():
        if e["codec"] == "alias":
            out[name] = out[e["params"]["target"]]  # an earlier entry: already rebuilt
            continue
        assert e["codec"] == "bitdelta" and e["params"] == {"granularity": "row"}
        rows, cols = e["shape"]
        bits = np.unpackbits(stored[e["stored"]["sign"]], axis=1, bitorder="little")[:, :cols].astype(bool)
        scale = stored[e["stored"]["scale"]][:, None]
        out[name] = base[name].astype(np.float32) + np.where(bits, scale, -scale).astype(np.float32)
    return out


def test_alias_worked_example(tmp_path: Path) -> None:
    """6.9: deltahub and an independent reader rebuild both names to 6.1's values, bit for bit; the digests and
    base_sha256 of the example are those of the bytes."""
    from deltahub.delta import Delta
    from deltahub.format.io import Checkpoint

    tensors = json.loads("\n".join(spec_block("alias-example")))
    assert list(tensors) == ["model.embed_tokens.weight", "lm_head.weight"]
    delta_dir, base_file = _alias_delta(tmp_path, tensors)
    want = np.array([[0.45, -0.45, 0.45, 0.45, -0.45, 0.45, -0.45, 0.45, 0.45, -0.45], [-0.5] * 10], dtype=np.float32)
    ref = _ref_rebuild(delta_dir, base_file)
    d = Delta(delta_dir)
    with Checkpoint(base_file) as base:
        got = dict(d.iter_tensors(base))  # digests, base sha256 per tensor and the fingerprint all checked
    assert list(got) == list(tensors)
    for name in tensors:
        assert np.array_equal(got[name].numpy(), want) and np.array_equal(ref[name], want)
        assert got[name].numpy().tobytes() == ref[name].tobytes()
    assert d.manifest.coded("lm_head.weight")[0] == "model.embed_tokens.weight"
    assert d.manifest.tensors["lm_head.weight"].stored_bytes == 0


def _aliased(tensors: dict, **change: object) -> dict:
    out = json.loads(json.dumps(tensors))
    out["lm_head.weight"].update(change)
    return out


ALIAS_BREAKS = {
    "names itself": lambda t: _aliased(t, params={"target": "lm_head.weight"}),
    "is not a tensor": lambda t: _aliased(t, params={"target": "model.norm.weight"}),
    "empty target": lambda t: _aliased(t, params={"target": ""}),
    "extra param": lambda t: _aliased(t, params={"target": "model.embed_tokens.weight", "rows": 2}),
    "comes after": lambda t: {"lm_head.weight": t["lm_head.weight"], "model.embed_tokens.weight": t["model.embed_tokens.weight"]},
    "chain": lambda t: {**t, "output.weight": {**t["lm_head.weight"], "params": {"target": "lm_head.weight"}}},
    "shape": lambda t: _aliased(t, shape=[10, 2]),
    "dtype": lambda t: _aliased(t, dtype="float16"),
    "base_sha256": lambda t: _aliased(t, base_sha256="0" * 64),
    "no base_sha256": lambda t: {**t, "lm_head.weight": {k: v for k, v in t["lm_head.weight"].items() if k != "base_sha256"}},
    "stores": lambda t: _aliased(t, stored={"sign": "lm_head.weight.sign"}),
}


@pytest.mark.parametrize("name", sorted(ALIAS_BREAKS))
def test_alias_rules_are_refused(tmp_path: Path, name: str) -> None:
    """Every break of a 4.11 rule is a one-line ManifestError naming delta_config.json and the entry, before any read."""
    from deltahub.delta import Delta
    from deltahub.errors import ManifestError

    broken = ALIAS_BREAKS[name](json.loads("\n".join(spec_block("alias-example"))))
    delta_dir, _ = _alias_delta(tmp_path, broken)
    with pytest.raises(ManifestError) as info:
        Delta(delta_dir)
    msg = str(info.value)
    assert "\n" not in msg and "delta_config.json" in msg and "alias entry" in msg
    assert ("'output.weight'" if name == "chain" else "'lm_head.weight'") in msg
