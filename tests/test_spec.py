"""format_spec.md's worked example, byte for byte."""

import struct

import torch

from deltahub.codecs import EncodeInput, get_codec
from deltahub.format.io import fingerprint


def test_worked_example_bytes() -> None:
    delta = torch.tensor([[0.5, -0.25, 0, 1, -1, 0.25, -0.5, 0.75, 0.125, -0.125], [-0.5] * 10])
    base = torch.zeros(2, 10)
    codec = get_codec("bitdelta")
    params = codec.validate_params({"granularity": "row"})
    enc = codec.encode(EncodeInput("model.layers.0.mlp.up_proj.weight", base + delta, base), params)
    assert bytes(enc.tensors["sign"].flatten().tolist()) == bytes([0xAD, 0x01, 0x00, 0x00])
    assert enc.tensors["scale"].dtype == torch.float32
    assert enc.tensors["scale"].numpy().tobytes() == bytes.fromhex("6666E63E0000003F")
    assert struct.unpack("<f", bytes.fromhex("6666E63E"))[0] == torch.tensor(0.45).item()
    decoded = codec.decode_delta(enc.tensors, enc.params, (2, 10))
    s = torch.tensor(0.45)
    assert torch.equal(decoded[0], torch.stack([s, -s, s, s, -s, s, -s, s, s, -s]))
    assert torch.equal(decoded[1], torch.full((10,), -0.5))
    assert enc.nbytes == 12


def test_fingerprint_line_format() -> None:
    import hashlib

    digest = "ab" * 32
    fp = fingerprint({"b": (torch.float32, (2, 3), digest), "a": (torch.bfloat16, (), digest)})
    expected = hashlib.sha256(f"a\tBF16\t[]\t{digest}\nb\tF32\t[2,3]\t{digest}\n".encode()).hexdigest()
    assert fp == "sha256:" + expected


def test_dtype_table_matches_the_reader() -> None:
    """format_spec.md's dtype table is exactly the set of dtypes the reader accepts, with their spellings and sizes."""
    import re
    from pathlib import Path

    from deltahub.format.spec import DTYPE_TO_STR, NAME_TO_DTYPE

    text = (Path(__file__).resolve().parents[1] / "format_spec.md").read_text()
    table = text.split("<!-- dtype-table -->", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| `([a-z0-9_]+)` \| `([A-Z0-9_]+)` \| (\d+) \|$", table, re.M)
    assert {r[0] for r in rows} == set(NAME_TO_DTYPE)
    for name, st, size in rows:
        assert DTYPE_TO_STR[NAME_TO_DTYPE[name]] == st and NAME_TO_DTYPE[name].itemsize == int(size)
