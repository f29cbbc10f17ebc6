"""Format 1.1 integrity: digests of stored tensors, files and the manifest; zstd checksums; 1.0 still read."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import pytest
import torch
import zstandard
from safetensors.torch import load_file

from conftest import make_tiny_pair
from deltahub.codecs import _zstd
from deltahub.compression import compress
from deltahub.delta import Delta, apply_delta
from deltahub.errors import (
    CodecError,
    DeltaHubError,
    IntegrityError,
    ManifestError,
    MissingFileError,
    UnsupportedFormatError,
)
from deltahub.format.integrity import (
    bytes_digest,
    manifest_bytes,
    tensor_digest,
    verify_aux_file,
    verify_manifest_bytes,
)
from deltahub.format.io import SafetensorsFile, save_tensors
from deltahub.format.manifest import Manifest
from deltahub.format.spec import FORMAT_VERSION, MANIFEST_NAME

SPEC = Path(__file__).resolve().parents[1] / "format_spec.md"

CODECS = {
    "bitdelta": {},
    "raw": {"zstd_level": 3},
    "deltadq": {"p": 0.5, "bits": 4, "parts": 2},
    "dare": {"p": 0.5},
    "topk-ternary": {"density": 0.05, "mask_encoding": "indices"},
}


def spec_block(name: str) -> str:
    m = re.search(rf"<!-- test-vectors: {re.escape(name)} -->\s*```[a-z]*\n(.*?\n)```", SPEC.read_text(encoding="utf-8"), re.DOTALL)
    assert m, f"format_spec.md has no test-vectors block {name!r}"
    return m.group(1)


def _make(tmp_path: Path, codec: str, **kw) -> tuple[Path, Path, Path]:  # type: ignore[no-untyped-def]
    base, ft = make_tiny_pair(tmp_path, **kw)
    (ft / "tokenizer.json").write_text('{"version": "1.0", "model": {"vocab": {"a": 0}}}\n')
    compress(base, ft, tmp_path / "delta", codec=codec, params=CODECS[codec], progress=False)
    return base, ft, tmp_path / "delta"


def _manifest(d: Path) -> dict:
    return json.loads((d / MANIFEST_NAME).read_text())


def _edit_manifest(d: Path, fn) -> None:  # type: ignore[no-untyped-def]
    m = _manifest(d)
    fn(m)
    (d / MANIFEST_NAME).write_bytes(manifest_bytes(m))


def _flip(path: Path, offset: int, mask: int = 0x01) -> bytes:
    data = path.read_bytes()
    b = bytearray(data)
    b[offset] ^= mask
    path.write_bytes(bytes(b))
    return data


# --------------------------------------------------------------------------------------------- writing


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_written_digests_match_stored_bytes(tmp_path: Path, codec: str) -> None:
    _, _, d = _make(tmp_path, codec)
    m = _manifest(d)
    assert m["format_version"] == FORMAT_VERSION == "1.3"
    verify_manifest_bytes((d / MANIFEST_NAME).read_bytes(), m, path=d / MANIFEST_NAME)
    f = SafetensorsFile(d / "delta.safetensors")
    for name, e in m["tensors"].items():
        assert set(e.get("digests", {})) == set(e["stored"]), name
        for role, key in e["stored"].items():
            info = f.tensors[key]
            assert e["digests"][role] == tensor_digest(info.dtype, info.shape, f.read_bytes(key).numpy().tobytes())
    assert set(m["file_digests"]) == {"tokenizer.json"}
    for name, digest in m["file_digests"].items():
        assert digest == "sha256:" + hashlib.sha256((d / name).read_bytes()).hexdigest()
    # 1.2: the generation config equals the base's, so it is referenced (with its digest), not stored.
    assert not (d / "generation_config.json").exists()
    assert m["base_files"] == {"generation_config.json": "sha256:" + hashlib.sha256(
        (tmp_path / "base" / "generation_config.json").read_bytes()).hexdigest()}
    f.close()


def test_sharded_index_has_a_file_digest(tmp_path: Path) -> None:
    base, ft = make_tiny_pair(tmp_path)
    compress(base, ft, tmp_path / "delta", max_shard_size=3000, codec="bitdelta", progress=False)
    d = tmp_path / "delta"
    m = _manifest(d)
    assert "delta.safetensors.index.json" in m["file_digests"]
    assert not any(n.endswith(".safetensors") for n in m["file_digests"])
    data = _flip(d / "delta.safetensors.index.json", 30, 0x20)
    with pytest.raises(IntegrityError, match="index.json"):
        Delta(d)
    (d / "delta.safetensors.index.json").write_bytes(data)
    Delta(d).close()


def test_zstd_frames_have_checksum_flag(tmp_path: Path) -> None:
    frame = _zstd.compress(b"\x00" * 1000 + bytes(range(256)), 3).numpy().tobytes()
    assert zstandard.get_frame_parameters(frame).has_checksum
    # every frame a compress run writes (raw's zstd payloads, indices masks)
    for codec in ("raw", "topk-ternary"):
        _, _, d = _make(tmp_path / codec, codec)
        sd = load_file(d / "delta.safetensors")
        frames = [k for k in sd if k.endswith((".zstd", ".mask"))]
        assert frames
        for k in frames:
            if k.endswith(".mask") and sd[k].ndim != 1:
                continue  # bitmap, not a frame
            assert zstandard.get_frame_parameters(sd[k].numpy().tobytes()).has_checksum, k


def test_zstd_checksum_is_verified_and_optional() -> None:
    content = bytes(range(256)) * 8
    frame = bytearray(_zstd.compress(content, 3).numpy().tobytes())
    assert _zstd.decompress_frame(bytes(frame), what="x", size=len(content)) == content
    frame[-1] ^= 0x01  # the checksum's last byte
    with pytest.raises(CodecError, match="corrupt zstd frame"):
        _zstd.decompress_frame(bytes(frame), what="x", size=len(content))
    # a 1.0 frame (no checksum) still decodes
    old = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(content)
    assert not zstandard.get_frame_parameters(old).has_checksum
    assert _zstd.decompress_frame(old, what="x", size=len(content)) == content


# --------------------------------------------------------------------------------------------- stored tensors


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_flip_in_every_stored_tensor_is_caught(tmp_path: Path, codec: str) -> None:
    base, _, d = _make(tmp_path, codec)
    path = d / "delta.safetensors"
    f = SafetensorsFile(path)
    infos = dict(f.tensors)
    f.close()
    owner = {k: (n, r) for n, e in _manifest(d)["tensors"].items() for r, k in e["stored"].items()}
    assert infos and set(infos) == set(owner)
    rng = random.Random(0)
    for key, info in infos.items():
        if not info.nbytes:
            continue
        tensor, role = owner[key]
        data = _flip(path, info.start + rng.randrange(info.nbytes), 1 << rng.randrange(8))
        try:
            with pytest.raises(IntegrityError) as exc:
                apply_delta(d, base, tmp_path / "out", progress=False)
            assert tensor in str(exc.value) and key in str(exc.value) and "delta.safetensors" in str(exc.value)
            assert not (tmp_path / "out").exists()
            assert not list(tmp_path.glob(".out*"))  # no temporary directory left either
            dl = Delta(d)
            with pytest.raises(IntegrityError):  # per-tensor read paths (resident mode) verify too
                dl.reconstruct(tensor, None) if codec == "raw" else dl.delta_tensor(tensor)
            dl.close()
        finally:
            path.write_bytes(data)
    apply_delta(d, base, tmp_path / "out", progress=False)  # restored: fine again


def test_header_dtype_change_is_caught(tmp_path: Path) -> None:
    """A same-size dtype flip in the safetensors header (F16 -> I16) would change the decode: the
    codec's header check refuses it first; with that check bypassed, the digest (which covers the
    dtype) still does."""
    from deltahub.codecs.dare import Dare
    from deltahub.errors import CodecError

    base, _, d = _make(tmp_path, "dare")
    path = d / "delta.safetensors"
    raw = path.read_bytes()
    i = raw.index(b'"dtype":"F16"')
    path.write_bytes(raw[:i] + b'"dtype":"I16"' + raw[i + len(b'"dtype":"I16"'):])
    with pytest.raises(CodecError, match="values"):
        Delta(d).state_dict(base, progress=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Dare, "check_decode", lambda self, *a, **k: None)
        with pytest.raises(IntegrityError, match="values"):
            Delta(d).state_dict(base, progress=False)


def test_state_dict_and_resident_attach_verify(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from deltahub.resident import attach_delta

    base, _, d = _make(tmp_path, "bitdelta")
    path = d / "delta.safetensors"
    f = SafetensorsFile(path)
    info = f.tensors["model.layers.1.mlp.down_proj.weight.sign"]
    f.close()
    _flip(path, info.start + 3)
    with pytest.raises(IntegrityError, match="down_proj"):
        Delta(d).state_dict(base, progress=False)
    model = AutoModelForCausalLM.from_pretrained(base)
    with pytest.raises(IntegrityError, match="down_proj"):
        attach_delta(model, d, "a")


# --------------------------------------------------------------------------------------------- files and manifest


def test_flip_in_aux_file_is_caught(tmp_path: Path) -> None:
    base, _, d = _make(tmp_path, "bitdelta")
    for name in ("tokenizer.json",):
        data = _flip(d / name, 5)
        with pytest.raises(IntegrityError, match=re.escape(name)):
            apply_delta(d, base, tmp_path / "out", progress=False)
        assert not (tmp_path / "out").exists()
        with pytest.raises(IntegrityError):
            verify_aux_file(d, name, Delta(d).manifest)
        (d / name).write_bytes(data)
    (d / "tokenizer.json").unlink()
    with pytest.raises(MissingFileError, match="tokenizer.json"):
        apply_delta(d, base, tmp_path / "out", progress=False)


def test_base_files_are_taken_from_the_base_and_checked(tmp_path: Path) -> None:
    """1.2 ``base_files``: an aux file equal to the base's is not stored; apply copies the base's after
    checking its digest; a changed or missing base copy is a typed error before anything is written."""
    base, ft, d = _make(tmp_path, "bitdelta")
    gen = base / "generation_config.json"
    assert "generation_config.json" in Delta(d).manifest.base_files and not (d / "generation_config.json").exists()
    out = apply_delta(d, base, tmp_path / "out", progress=False)
    assert (out / "generation_config.json").read_bytes() == (ft / "generation_config.json").read_bytes()
    original = gen.read_bytes()
    gen.write_bytes(original.replace(b"{", b"{ ", 1))
    with pytest.raises(IntegrityError, match="generation_config.json"):
        apply_delta(d, base, tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()
    with pytest.warns(UserWarning, match="generation_config.json"):  # forced onto another base: left out, warned
        apply_delta(d, base, tmp_path / "out3", progress=False, check_base=False)
    assert not (tmp_path / "out3" / "generation_config.json").exists()
    gen.unlink()
    with pytest.raises(MissingFileError, match="generation_config.json"):
        apply_delta(d, base, tmp_path / "out4", progress=False)
    gen.write_bytes(original)
    kept = compress(base, ft, tmp_path / "kept", codec="bitdelta", progress=False, keep_aux_files=True)
    assert not kept.base_files and (tmp_path / "kept" / "generation_config.json").read_bytes() == original


def test_digit_flip_in_manifest_is_caught(tmp_path: Path) -> None:
    base, _, d = _make(tmp_path, "deltadq")
    p = d / MANIFEST_NAME
    raw = p.read_bytes()
    i = raw.index(b'"seed": ') + len(b'"seed": ')
    p.write_bytes(raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1:])  # seed 0 -> 1: valid JSON, different model
    with pytest.raises(IntegrityError, match="delta_config.json") as exc:
        apply_delta(d, base, tmp_path / "out", progress=False)
    assert "manifest_digest" in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_any_byte_flip_in_manifest_is_caught(tmp_path: Path) -> None:
    _, _, d = _make(tmp_path, "deltadq")
    p = d / MANIFEST_NAME
    raw = p.read_bytes()
    rng = random.Random(1)
    for _ in range(150):
        i, bit = rng.randrange(len(raw)), 1 << rng.randrange(8)
        p.write_bytes(raw[:i] + bytes([raw[i] ^ bit]) + raw[i + 1:])
        with pytest.raises(DeltaHubError):
            Delta(d)
    p.write_bytes(raw)
    Delta(d).close()


def test_missing_digests_in_1_1_are_refused(tmp_path: Path) -> None:
    _, _, d = _make(tmp_path, "bitdelta")
    name = "model.layers.0.mlp.up_proj.weight"
    _edit_manifest(d, lambda m: m["tensors"][name].pop("digests"))
    with pytest.raises(ManifestError, match="digests"):
        Delta(d)
    _edit_manifest(d, lambda m: (m.pop("file_digests"), m["tensors"][name].update(digests={"sign": "sha256:" + "1" * 64})))
    with pytest.raises(ManifestError):
        Delta(d)
    m = _manifest(d)
    m.pop("manifest_digest")
    (d / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="manifest_digest"):
        Delta(d)


@pytest.mark.parametrize("where", ["tensor", "file", "manifest"])
def test_unknown_algorithm_is_refused(tmp_path: Path, where: str) -> None:
    _, _, d = _make(tmp_path, "bitdelta")
    name = "model.layers.0.mlp.up_proj.weight"
    if where == "tensor":
        _edit_manifest(d, lambda m: m["tensors"][name]["digests"].update(sign="blake3:" + "ab" * 32))
    elif where == "file":
        _edit_manifest(d, lambda m: m["file_digests"].update({"tokenizer.json": "sha3-256:" + "ab" * 32}))
    else:
        p = d / MANIFEST_NAME
        m = json.loads(p.read_text())
        p.write_bytes(p.read_bytes().replace(m["manifest_digest"].encode(), b"blake2b:" + m["manifest_digest"][7:].encode()))
    with pytest.raises(UnsupportedFormatError, match="not supported"):
        Delta(d)


def test_malformed_digest_is_refused(tmp_path: Path) -> None:
    _, _, d = _make(tmp_path, "bitdelta")
    name = "model.layers.0.mlp.up_proj.weight"
    _edit_manifest(d, lambda m: m["tensors"][name]["digests"].update(sign=m["tensors"][name]["digests"]["sign"].upper()))
    with pytest.raises(ManifestError, match="digest"):
        Delta(d)


# --------------------------------------------------------------------------------------------- format 1.0


def _to_v1_0(d: Path) -> None:
    """Rewrite a 1.1 delta as a 1.0 writer made it: no digest keys, zstd frames without checksum."""
    path = d / "delta.safetensors"
    f = SafetensorsFile(path)
    meta = dict(f.metadata, format_version="1.0")
    f.close()
    sd = {k: v.clone() for k, v in load_file(path).items()}  # not mmap'd: the file is rewritten below
    for k, t in sd.items():
        blob = t.numpy().tobytes()
        if t.ndim == 1 and blob[:4] == b"\x28\xb5\x2f\xfd":  # a zstd frame
            content = zstandard.ZstdDecompressor().decompress(blob)
            old = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(content)
            sd[k] = torch.frombuffer(bytearray(old), dtype=torch.uint8)
    save_tensors(path, sd, meta)
    m = _manifest(d)
    for key in ("manifest_digest", "file_digests"):
        m.pop(key)
    for e in m["tensors"].values():
        e.pop("digests", None)
    m["format_version"] = "1.0"
    (d / MANIFEST_NAME).write_text(json.dumps(m, indent=2) + "\n")


@pytest.mark.parametrize("codec", ["raw", "topk-ternary", "deltadq"])
def test_v1_0_delta_still_rebuilds_bit_identically(tmp_path: Path, codec: str) -> None:
    base, _, d = _make(tmp_path, codec)
    expected = Delta(d).state_dict(base, progress=False)
    _to_v1_0(d)
    assert not any(zstandard.get_frame_parameters(t.numpy().tobytes()).has_checksum
                   for t in load_file(d / "delta.safetensors").values() if t.ndim == 1 and t.numpy().tobytes()[:4] == b"\x28\xb5\x2f\xfd")
    dl = Delta(d)
    assert dl.manifest.format_version == "1.0" and not dl.manifest.file_digests
    got = dl.state_dict(base, progress=False)
    assert got.keys() == expected.keys()
    for k in got:
        assert torch.equal(got[k].view(torch.uint8), expected[k].view(torch.uint8)), k
    out = apply_delta(d, base, tmp_path / "out", progress=False)
    assert (out / "tokenizer.json").read_bytes() == (d / "tokenizer.json").read_bytes()


# --------------------------------------------------------------------------------------------- spec vectors


def test_spec_digest_vectors() -> None:
    lines = [ln for ln in spec_block("digests").splitlines() if ln.strip()]
    assert len(lines) == 4
    for line in lines:
        lhs, _, expected = line.partition("=")
        kind, *args = lhs.split()
        if kind == "tensor":
            m = re.fullmatch(r"(\w+) \[([\d, ]*)\] (\S+)", " ".join(args))
            assert m, line
            shape = [int(s) for s in m.group(2).split(",") if s.strip()]
            payload = b"" if m.group(3) == "-" else bytes.fromhex(m.group(3))
            got = tensor_digest(m.group(1), shape, payload)
            # the rule spelled out independently of the code
            line_bytes = f"{m.group(1)}\t{json.dumps(shape, separators=(',', ':'))}\n".encode()
            assert got == "sha256:" + hashlib.sha256(line_bytes + payload).hexdigest()
        else:
            assert kind == "file"
            got = bytes_digest(bytes.fromhex(args[0]))
        assert got == expected.strip(), line


def test_spec_manifest_digest_example(tmp_path: Path) -> None:
    raw = spec_block("manifest-digest").encode()
    m = json.loads(raw)
    value = m["manifest_digest"]
    hexdigest = value.split(":", 1)[1]
    assert raw.count(value.encode()) == 1
    assert hashlib.sha256(raw.replace(hexdigest.encode(), b"0" * 64)).hexdigest() == hexdigest
    assert value.startswith("sha256:33bb9c79") and value.endswith("0d49")  # as the spec's text says
    verify_manifest_bytes(raw, m, path="example")
    # a valid 1.1 manifest: loads, and its tensor digests are those of 6.1's stored bytes
    (tmp_path / MANIFEST_NAME).write_bytes(raw)
    manifest = Manifest.load(tmp_path)
    e = manifest.tensors["model.layers.0.mlp.up_proj.weight"]
    assert e.digests == {"sign": tensor_digest("U8", [2, 2], bytes.fromhex("ad010000")),
                         "scale": tensor_digest("F32", [2], bytes.fromhex("6666e63e0000003f"))}
    assert manifest.file_digests["generation_config.json"] == bytes_digest(b"{}\n")
    # one changed byte anywhere (here the fine-tune's name) is caught
    (tmp_path / MANIFEST_NAME).write_bytes(raw.replace(b'"ft"', b'"fu"'))
    with pytest.raises(IntegrityError, match="manifest_digest"):
        Manifest.load(tmp_path)
    # the writer's rule reproduces the recorded value for its own serialization
    written = manifest_bytes(m)
    verify_manifest_bytes(written, json.loads(written), path="written")


def test_cli_info_and_apply_exit_code(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from deltahub.cli import app

    base, _, d = _make(tmp_path, "bitdelta")
    runner = CliRunner()
    r = runner.invoke(app, ["info", str(d), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["integrity"] == "sha256 (verified on read)"
    r = runner.invoke(app, ["info", str(d)])
    assert r.exit_code == 0 and "sha256 (verified on read)" in r.output
    f = SafetensorsFile(d / "delta.safetensors")
    info = f.tensors["model.layers.0.self_attn.q_proj.weight.scale"]
    f.close()
    _flip(d / "delta.safetensors", info.start)
    r = runner.invoke(app, ["apply", str(d), "--base", str(base), "-o", str(tmp_path / "out"), "-q"])
    assert r.exit_code == 1 and "q_proj" in r.output and "digest" in r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [
    {"../tokenizer.json": "sha256:" + "0" * 64},
    {"model.safetensors": "sha256:" + "0" * 64},
    {"delta.safetensors": "sha256:" + "0" * 64},
    {"modeling_x.py": "sha256:" + "0" * 64},
    {"tokenizer.json": "sha256:" + "0" * 64},  # also in files
    {"generation_config.json": "md5:" + "0" * 32},
    {"generation_config.json": 3},
    ["generation_config.json"],
])
def test_bad_base_files_are_refused(tmp_path: Path, value: object) -> None:
    base, _, d = _make(tmp_path, "bitdelta")
    _edit_manifest(d, lambda m: m.update(base_files=value))
    with pytest.raises(DeltaHubError):
        apply_delta(d, base, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_stored_tensor_named_by_two_entries_is_refused(tmp_path: Path) -> None:
    """Stored names are ``<tensor>.<role>``: an entry pointing at another entry's stored tensors (whose recorded
    digest would then be checked for only one of them) is a one-line ManifestError, before anything is read."""
    base, _, d = _make(tmp_path, "bitdelta")
    a, b = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    _edit_manifest(d, lambda m: m["tensors"][b].update(stored=m["tensors"][a]["stored"], digests=m["tensors"][a]["digests"]))
    with pytest.raises(ManifestError, match="both name stored tensor"):
        apply_delta(d, base, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
