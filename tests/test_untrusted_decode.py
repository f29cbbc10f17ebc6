"""Untrusted deltas: every corruption of the manifest or the safetensors headers is a one-line typed error.

Tiny deltas are made for every codec layout, then their manifest JSON / safetensors headers are
mutated and read back through the public API. Every outcome must be a rebuilt tensor or a
``DeltaHubError`` naming the tensor or the file, never KeyError / TypeError / ZeroDivisionError /
OverflowError / ValueError / RuntimeError / MemoryError, and no decode step may allocate more than
O(output tensor) whatever the numbers in the manifest say.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import make_tiny_pair
from deltahub.compression import compress
from deltahub.delta import Delta
from deltahub.errors import (CodecError, CorruptFileError, DeltaHubError, InvalidCodecParamsError, ManifestError,
                             ShapeMismatchError, UnsupportedFormatError)
from deltahub.format.io import Checkpoint, save_tensors

pytestmark = pytest.mark.usefixtures("decode_impl")  # native kernels and numpy paths alike

TARGET = "model.layers.0.mlp.down_proj.weight"  # [32, 64]
NORM = "model.layers.0.input_layernorm.weight"  # unchanged
NEW = "extra.new_tensor"  # only in the fine-tune: raw full

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "bitdelta-tensor": ("bitdelta", {"granularity": "tensor"}),
    "bitdelta-row": ("bitdelta", {"granularity": "row"}),
    "bitdelta-group": ("bitdelta", {"granularity": "group", "group_size": 8}),
    "bitdelta-widegroup": ("bitdelta", {"granularity": "group", "group_size": 128}),
    "deltadq-kmeans": ("deltadq", {"preset": "16x"}),
    "deltadq-uniform": ("deltadq", {"preset": "32x", "quantizer": "uniform"}),
    "deltadq-parts1-none": ("deltadq", {"preset": "64x", "parts": 1, "entropy": "none"}),
    "deltadq-parts4": ("deltadq", {"preset": "16x", "parts": 4}),
    "deltadq-bigqgroup": ("deltadq", {"preset": "16x", "quantizer": "uniform", "qgroup": 100000}),
    "dare": ("dare", {}),
    "topk-bitmap": ("topk-ternary", {"mask_encoding": "bitmap"}),
    "topk-indices": ("topk-ternary", {"mask_encoding": "indices", "density": 0.05}),
    "rowsparse-bitmap": ("rowsparse", {"density": 0.5, "bits": 3, "mask_encoding": "bitmap"}),
    "rowsparse-indices": ("rowsparse", {"density": 0.25, "bits": 2, "group_size": 8, "mask_encoding": "indices",
                                        "entropy": "zstd"}),
    "lowrank": ("lowrank", {"rank": 4}),
    "lowrank-bf16": ("lowrank", {"rank": 64, "dtype": "bfloat16"}),
    "lowrank-mp": ("lowrank-mp", {"bands": [[2, 8], [3, 3], [5, 2]], "qgroup": 16}),
    "lowrank-residual": ("lowrank-residual", {"rank": 2}),
    "raw-xor": ("raw", {"mode": "xor"}),
    "raw-xor-plain": ("raw", {"mode": "xor", "zstd_level": 0}),
    "raw-full": ("raw", {"mode": "full"}),
    "raw-full-plain": ("raw", {"mode": "full", "zstd_level": 0}),
}


@pytest.fixture(scope="module")
def deltas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("untrusted")
    base, ft = make_tiny_pair(root)
    # A tensor the base does not have (stored raw, mode full) and one of zeros (zstd shrinks it a lot).
    sd = Checkpoint(ft).__enter__()
    tensors = {n: sd.read(n) for n in sd.keys()}
    sd.close()
    tensors[NEW] = torch.zeros(64, 64)
    save_tensors(ft / "model.safetensors", tensors, {"format": "pt"})
    out: dict[str, Any] = {"base": base, "root": root}
    for name, (codec, params) in VARIANTS.items():
        compress(base, ft, root / name, codec=codec, params=params, progress=False, compute_stats=False)
        out[name] = root / name
    with Checkpoint(base) as ck:
        out["base_tensors"] = {n: ck.read(n) for n in ck.keys()}
    return out


def _copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def _manifest(d: Path) -> dict[str, Any]:
    return json.loads((d / "delta_config.json").read_text())


def _write_manifest(d: Path, m: dict[str, Any]) -> None:
    from deltahub.format.integrity import manifest_bytes

    (d / "delta_config.json").write_bytes(manifest_bytes(m))  # re-sealed: these tests are about the edited field


def _mutated(deltas: dict[str, Any], variant: str, tmp_path: Path, fn: Any) -> Path:
    d = _copy(deltas[variant], tmp_path / f"{variant}-mut")
    m = _manifest(d)
    fn(m)
    _write_manifest(d, m)
    return d


def _rebuild(d: Path, base_tensors: dict[str, torch.Tensor], name: str = TARGET) -> torch.Tensor:
    delta = Delta(d)
    try:
        return delta.reconstruct(name, base_tensors.get(name))
    finally:
        delta.close()


def _header(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(path: Path, header: dict[str, Any] | str, data: bytes) -> None:
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------------------------- sanity


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_rebuilds(deltas: dict[str, Any], variant: str) -> None:
    """The unmutated deltas decode (the checks refuse nothing a writer produces)."""
    d = Delta(deltas[variant])
    try:
        sd = d.state_dict(deltas["base"])
    finally:
        d.close()
    assert sd[TARGET].shape == (32, 64)
    assert d.manifest.tensors[NEW].codec == "raw" and d.manifest.tensors[NEW].params["mode"] == "full"
    assert d.manifest.tensors[NORM].codec == "unchanged"


# ---------------------------------------------------------------------------------------- table of params

BAD_VALUES: list[Any] = [None, True, False, "x", "", -1, 0, 1e12, 10**12, 2**63, -(2**63), 0.5, float("nan"),
                         float("inf"), float("-inf"), [1], {"a": 1}]
TABLE_VARIANTS = ["bitdelta-tensor", "bitdelta-group", "deltadq-kmeans", "deltadq-uniform", "deltadq-parts1-none",
                  "dare", "topk-bitmap", "topk-indices", "raw-xor", "raw-full-plain", "lowrank", "lowrank-mp",
                  "lowrank-residual"]


@pytest.mark.parametrize("variant", TABLE_VARIANTS)
def test_mutated_params_table(deltas: dict[str, Any], variant: str, tmp_path: Path) -> None:
    """Every param of the entry set to every kind of bad value (and removed): rebuilt or DeltaHubError naming it."""
    target = NEW if variant.startswith("raw-full") else TARGET
    d = _copy(deltas[variant], tmp_path / "d")
    original = _manifest(d)
    keys = sorted(original["tensors"][target]["params"]) + ["granularity", "group_size", "qgroup", "mask_encoding", "rank"]
    outcomes: dict[str, int] = {"ok": 0, "error": 0}
    for key in dict.fromkeys(keys):
        for value in [*BAD_VALUES, "<missing>"]:
            m = copy.deepcopy(original)
            params = m["tensors"][target]["params"]
            if value == "<missing>":
                params.pop(key, None)
            else:
                params[key] = value
            _write_manifest(d, m)
            t0 = time.perf_counter()
            try:
                out = _rebuild(d, deltas["base_tensors"], target)
            except DeltaHubError as exc:
                assert target in _one_line(exc), (key, value, exc)
                outcomes["error"] += 1
            except Exception as exc:  # noqa: BLE001 - the point of the test
                pytest.fail(f"{variant}: params[{key!r}]={value!r} raised untyped {type(exc).__name__}: {exc}")
            else:
                assert out.shape == tuple(m["tensors"][target]["shape"])
                outcomes["ok"] += 1
            assert time.perf_counter() - t0 < 5, (key, value)
    assert outcomes["error"] > 0


@pytest.mark.parametrize("field,value", [("shape", [True, 64]), ("shape", [-1, 64]), ("shape", [2**41]),
                                         ("shape", [2**21, 2**21]), ("shape", "32x64"), ("shape", [32.0, 64]),
                                         ("dtype", "float"), ("dtype", "Tensor"), ("dtype", "half"), ("dtype", "complex64"),
                                         ("dtype", 5), ("codec", 7), ("params", [1]), ("stored", {"sign": 5}),
                                         ("stored", ["sign"]), ("base_sha256", "ABC"), ("base_sha256", "0" * 63),
                                         ("base_sha256", 12)])
def test_malformed_entry_fields(deltas: dict[str, Any], tmp_path: Path, field: str, value: Any) -> None:
    d = _mutated(deltas, "bitdelta-row", tmp_path, lambda m: m["tensors"][TARGET].__setitem__(field, value))
    with pytest.raises(ManifestError) as ei:
        Delta(d)
    assert TARGET in _one_line(ei.value) and "delta_config.json" in str(ei.value)


@pytest.mark.parametrize("mutate", [
    lambda m: m["tensors"].__setitem__("", m["tensors"].pop(TARGET)),
    lambda m: m["base"].__setitem__("fingerprint", "md5:abc"),
    lambda m: m["base"].__setitem__("fingerprint", 5),
    lambda m: m["base"].__setitem__("revision", ["main"]),
    lambda m: m["base"].__setitem__("extra_tensors", {"x": {"shape": [-1], "dtype": "float32", "sha256": "0" * 64}}),
    lambda m: m["base"].__setitem__("extra_tensors", {"x": {"shape": [1], "dtype": "float32", "sha256": "zz"}}),
    lambda m: m["base"].__setitem__("extra_tensors", [1]),
    lambda m: m.__setitem__("base", "b"),
    lambda m: m.__setitem__("tensors", []),
    lambda m: m.__setitem__("config", [1]),
    lambda m: m.__setitem__("files", 5),
    lambda m: m["tensors"].__setitem__(TARGET, 5),
    lambda m: m["tensors"][TARGET].pop("codec"),
])
def test_malformed_manifest(deltas: dict[str, Any], tmp_path: Path, mutate: Any) -> None:
    d = _mutated(deltas, "bitdelta-row", tmp_path, mutate)
    with pytest.raises(ManifestError) as ei:
        Delta(d)
    assert "delta_config.json" in _one_line(ei.value)


def test_manifest_duplicate_keys(deltas: dict[str, Any], tmp_path: Path) -> None:
    d = _copy(deltas["bitdelta-row"], tmp_path / "d")
    text = (d / "delta_config.json").read_text()
    (d / "delta_config.json").write_text(text.replace('"codec": "bitdelta",', '"codec": "bitdelta", "codec": "raw",', 1))
    with pytest.raises(CorruptFileError, match="appears twice") as ei:
        Delta(d)
    assert "delta_config.json" in _one_line(ei.value)


def test_informative_totals_and_stats_never_crash_info(deltas: dict[str, Any], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from deltahub.cli import app

    def garbage(m: dict[str, Any]) -> None:
        m["totals"] = {"parameters": "many", "stored_bytes": -5, "finetuned_bytes": float("nan"),
                       "finetuned_fp16_bytes": [1], "by_codec": {"bitdelta": {"tensors": "x"}}}
        m["tensors"][TARGET]["stats"] = {"delta_l2": "big", "error_l2": float("nan"), "auto_choice": 5,
                                         "auto_error": "bad", "auto_metric": None}
        m["tensors"][TARGET]["stored_bytes"] = "lots"

    d = _mutated(deltas, "bitdelta-row", tmp_path, garbage)
    for args in (["info", str(d)], ["info", str(d), "--tensors"], ["info", str(d), "--json"]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, (args, r.output, r.exception)
    from deltahub.format.spec import FORMAT_VERSION

    assert Delta(d).summary()["format_version"] == FORMAT_VERSION


# ---------------------------------------------------------------------------------------- stored tensors vs roles


def test_scale_dtype_swapped_in_header(deltas: dict[str, Any], tmp_path: Path) -> None:
    """scale F32 -> I32 in the header (same byte size): once silently decoded as 1e9-scale weights."""
    d = _copy(deltas["bitdelta-row"], tmp_path / "d")
    header, data = _header(d / "delta.safetensors")
    header[f"{TARGET}.scale"]["dtype"] = "I32"
    _write_header(d / "delta.safetensors", header, data)
    with pytest.raises(CodecError, match="'scale' is int32") as ei:
        Delta(d)
    assert TARGET in _one_line(ei.value)


@pytest.mark.parametrize("variant,role", [("bitdelta-row", "sign"), ("deltadq-kmeans", "codebook"), ("deltadq-kmeans", "low1"),
                                          ("deltadq-uniform", "qstep"), ("dare", "norm"), ("topk-indices", "mask"),
                                          ("lowrank", "vh"), ("lowrank-mp", "codes"), ("lowrank-residual", "scale")])
def test_missing_role(deltas: dict[str, Any], tmp_path: Path, variant: str, role: str) -> None:
    def drop(m: dict[str, Any]) -> None:
        e = m["tensors"][TARGET]
        e["stored"].pop(role)
        e["digests"].pop(role)  # a self-consistent manifest: the codec's own check must refuse it

    d = _mutated(deltas, variant, tmp_path, drop)
    with pytest.raises(CodecError, match="missing") as ei:
        Delta(d)
    assert TARGET in _one_line(ei.value)


@pytest.mark.parametrize("variant", ["bitdelta-row", "deltadq-kmeans", "dare", "raw-xor", "lowrank-mp"])
def test_extra_role(deltas: dict[str, Any], tmp_path: Path, variant: str) -> None:
    other = "model.layers.1.mlp.down_proj.weight"

    def add(m: dict[str, Any]) -> None:
        role, key = next(iter(m["tensors"][other]["stored"].items()))
        m["tensors"][TARGET]["stored"]["bonus"] = key
        m["tensors"][TARGET]["digests"]["bonus"] = m["tensors"][other]["digests"][role]

    d = _mutated(deltas, variant, tmp_path, add)
    with pytest.raises(CodecError, match="unexpected") as ei:
        Delta(d)
    assert TARGET in _one_line(ei.value)


def test_unchanged_with_stored_tensor_or_params(deltas: dict[str, Any], tmp_path: Path) -> None:
    d = _mutated(deltas, "bitdelta-row", tmp_path, lambda m: m["tensors"][NORM].__setitem__("params", {"x": 1}))
    with pytest.raises(InvalidCodecParamsError) as ei:
        Delta(d)
    assert NORM in _one_line(ei.value)


def test_delta_codec_without_base_sha256(deltas: dict[str, Any], tmp_path: Path) -> None:
    d = _mutated(deltas, "deltadq-kmeans", tmp_path, lambda m: m["tensors"][TARGET].pop("base_sha256"))
    with pytest.raises(ManifestError, match="base_sha256") as ei:
        Delta(d)
    assert TARGET in _one_line(ei.value)


def test_delta_shape_differs_from_base(deltas: dict[str, Any], tmp_path: Path) -> None:
    """A delta codec's shape must be the base tensor's (no reshaping the base into a larger output)."""
    d = _mutated(deltas, "raw-xor-plain", tmp_path, lambda m: m["tensors"][TARGET].__setitem__("shape", [64, 32]))
    delta = Delta(d)
    with pytest.raises(ShapeMismatchError) as ei:
        delta.state_dict(deltas["base"])
    assert TARGET in _one_line(ei.value)


# ---------------------------------------------------------------------------------------- memory amplification


def test_bitdelta_huge_group_size_is_o_numel(deltas: dict[str, Any], tmp_path: Path) -> None:
    """group_size 4e6 (was 2.1 GB RSS) or 2^62 on a [32, 64] tensor: a group wider than the row is the row."""
    want = _rebuild(deltas["bitdelta-widegroup"], deltas["base_tensors"])
    for g in (4_000_000, 2**62):
        d = _mutated(deltas, "bitdelta-widegroup", tmp_path,
                     lambda m, g=g: m["tensors"][TARGET]["params"].__setitem__("group_size", g))
        t0 = time.perf_counter()
        assert torch.equal(_rebuild(d, deltas["base_tensors"]), want)
        assert time.perf_counter() - t0 < 2
    # A huge group size that no longer fits the stored scales: refused from the header alone.
    d = _mutated(deltas, "bitdelta-group", tmp_path, lambda m: m["tensors"][TARGET]["params"].__setitem__("group_size", 4_000_000))
    with pytest.raises(CodecError, match="'scale'") as ei:
        Delta(d)
    assert TARGET in _one_line(ei.value)


def test_deltadq_huge_qgroup_is_o_numel(deltas: dict[str, Any], tmp_path: Path) -> None:
    """qgroup 5e8 (was 4 GB RSS) / 1e12 (asked torch for 4 TB): dequantizing gathers per value."""
    want = _rebuild(deltas["deltadq-bigqgroup"], deltas["base_tensors"])
    for q in (500_000_000, 10**12, 2**63 - 1):
        d = _mutated(deltas, "deltadq-bigqgroup", tmp_path, lambda m, q=q: m["tensors"][TARGET]["params"].__setitem__("qgroup", q))
        t0 = time.perf_counter()
        assert torch.equal(_rebuild(d, deltas["base_tensors"]), want)
        assert time.perf_counter() - t0 < 2
    d = _mutated(deltas, "deltadq-bigqgroup", tmp_path, lambda m: m["tensors"][TARGET]["params"].__setitem__("qgroup", 2**63))
    with pytest.raises(InvalidCodecParamsError, match="qgroup") as ei:
        Delta(d)
    assert TARGET in _one_line(ei.value)


def test_deltadq_group_size_larger_than_row(deltas: dict[str, Any], tmp_path: Path) -> None:
    d = _mutated(deltas, "deltadq-kmeans", tmp_path, lambda m: m["tensors"][TARGET]["params"].__setitem__("group_size", 128))
    with pytest.raises(InvalidCodecParamsError, match="group_size") as ei:
        Delta(d)
    assert TARGET in _one_line(ei.value)


def test_new_raw_tensor_cannot_declare_a_huge_shape(deltas: dict[str, Any], tmp_path: Path) -> None:
    """A small zstd frame + a manifest shape of 2^28 on a tensor the base lacks once wrote 1 GiB."""
    d = _mutated(deltas, "raw-full", tmp_path, lambda m: m["tensors"][NEW].__setitem__("shape", [2**14, 2**14]))
    delta = Delta(d)  # header-only checks pass: a zstd frame may legitimately expand this much
    out = tmp_path / "out"
    t0 = time.perf_counter()
    with pytest.raises(ManifestError, match="no same-shape counterpart") as ei:
        delta.apply(deltas["base"], out)
    assert time.perf_counter() - t0 < 5 and not out.exists()
    assert "delta_config.json" in _one_line(ei.value)
    with pytest.raises(ManifestError):
        delta.state_dict(deltas["base"])


def test_raw_frame_declaring_wrong_size(deltas: dict[str, Any], tmp_path: Path) -> None:
    d = _mutated(deltas, "raw-full", tmp_path, lambda m: m["tensors"][NEW].__setitem__("shape", [64, 65]))
    with pytest.raises(CodecError, match="zstd frame holds") as ei:
        Delta(d).state_dict(deltas["base"])
    assert NEW in _one_line(ei.value)


# ---------------------------------------------------------------------------------------- safetensors headers


def _corrupt_header(deltas: dict[str, Any], tmp_path: Path, fn: Any) -> Path:
    d = _copy(deltas["bitdelta-row"], tmp_path / "d")
    header, data = _header(d / "delta.safetensors")
    header, data = fn(header, data)
    _write_header(d / "delta.safetensors", header, data)
    return d


def _shift(name: str, delta: int) -> Any:
    def fn(h: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        h[name]["data_offsets"] = [x + delta for x in h[name]["data_offsets"]]
        return h, data
    return fn


@pytest.mark.parametrize("fn,match", [
    (lambda h, d: (json.dumps(h)[:-1] + ', "__metadata__": {"format": "pt"}}', d), "appears twice"),
    (lambda h, d: ({**h, "__metadata__": {"format": 1}}, d), "__metadata__"),
    (lambda h, d: ({**h, "__metadata__": ["x"]}, d), "__metadata__"),
    (lambda h, d: (h, d + b"\0" * 8), "belong to no tensor"),
    (lambda h, d: ({k: {**v, "shape": [True] * len(v["shape"])} if k != "__metadata__" else v for k, v in h.items()}, d), "shape"),
    (lambda h, d: ({k: {**v, "dtype": "C64"} if k != "__metadata__" else v for k, v in h.items()}, d), "dtype"),
    (lambda h, d: ({k: {**v, "data_offsets": [-8, 0]} if k != "__metadata__" else v for k, v in h.items()}, d), "data_offsets"),
    (lambda h, d: ({k: {"dtype": "U8"} if k != "__metadata__" else v for k, v in h.items()}, d), "header entry"),
])
def test_safetensors_header_corruptions(deltas: dict[str, Any], tmp_path: Path, fn: Any, match: str) -> None:
    d = _corrupt_header(deltas, tmp_path, fn)
    with pytest.raises(CorruptFileError, match=match) as ei:
        Delta(d)
    assert "delta.safetensors" in _one_line(ei.value)


def test_safetensors_duplicate_tensor_key(deltas: dict[str, Any], tmp_path: Path) -> None:
    def dup(h: dict[str, Any], data: bytes) -> tuple[str, bytes]:
        first = next(k for k in h if k != "__metadata__")
        text = json.dumps(h)
        return text[:-1] + f', {json.dumps(first)}: {json.dumps(h[first])}}}', data
    d = _corrupt_header(deltas, tmp_path, dup)
    with pytest.raises(CorruptFileError, match="appears twice"):
        Delta(d)


def test_safetensors_overlapping_ranges(deltas: dict[str, Any], tmp_path: Path) -> None:
    """Two tensors sharing bytes (the same bytes read under two roles) are refused like the safetensors library does."""
    def overlap(h: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"])
        a, b = names[-2], names[-1]
        size = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
        if h[a]["data_offsets"][1] - h[a]["data_offsets"][0] >= size and h[a]["dtype"] == h[b]["dtype"]:
            h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + size]
        else:
            h[b]["data_offsets"] = [h[b]["data_offsets"][0] - 1, h[b]["data_offsets"][1] - 1]
        return h, data
    d = _corrupt_header(deltas, tmp_path, overlap)
    with pytest.raises(CorruptFileError, match="overlaps|gap|no tensor") as ei:
        Delta(d)
    assert "delta.safetensors" in _one_line(ei.value)


# ---------------------------------------------------------------------------------------- config -> transformers class


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.mark.parametrize("archs", [["AutoTokenizer"], ["AutoModelForCausalLM"], ["Tensor"], ["PreTrainedModel"],
                                   ["BertModel"], ["NoSuchModel"], []])
def test_to_model_architectures_fall_back(deltas: dict[str, Any], tmp_path: Path, archs: Any, offline: None) -> None:
    """Only a PreTrainedModel subclass fitting the config is used; else the causal-LM class of model_type."""
    d = _mutated(deltas, "raw-xor", tmp_path, lambda m: m["config"].__setitem__("architectures", archs))
    t0 = time.perf_counter()
    model = Delta(d).to_model(deltas["base"])
    assert type(model).__name__ == "LlamaForCausalLM"
    assert time.perf_counter() - t0 < 30


@pytest.mark.parametrize("archs", ["LlamaForCausalLM", [5], [["os.system"]], ["os.system"], ["a b"]])
def test_malformed_architectures_refused(deltas: dict[str, Any], tmp_path: Path, archs: Any) -> None:
    """architectures is written into the rebuilt config.json: it must be a list of class names."""
    d = _mutated(deltas, "raw-xor", tmp_path, lambda m: m["config"].__setitem__("architectures", archs))
    with pytest.raises(ManifestError, match="architectures"):
        Delta(d)


@pytest.mark.parametrize("mutate,error", [
    (lambda c: c.pop("model_type"), UnsupportedFormatError),
    (lambda c: c.__setitem__("model_type", 5), UnsupportedFormatError),
    (lambda c: c.__setitem__("model_type", "no-such-model"), UnsupportedFormatError),
    (lambda c: c.__setitem__("num_hidden_layers", 10**6), UnsupportedFormatError),
    (lambda c: c.__setitem__("hidden_size", "wide"), UnsupportedFormatError),
    (lambda c: c.__setitem__("vocab_size", 10**9), ShapeMismatchError),
    (lambda c: c.__setitem__("intermediate_size", 128), ShapeMismatchError),
])
def test_to_model_bad_config(deltas: dict[str, Any], tmp_path: Path, mutate: Any, error: type, offline: None) -> None:
    d = _mutated(deltas, "raw-xor", tmp_path, lambda m: mutate(m["config"]))
    t0 = time.perf_counter()
    with pytest.raises(error) as ei:
        Delta(d).to_model(deltas["base"])
    _one_line(ei.value)
    assert time.perf_counter() - t0 < 30


def test_rebuilt_values_unchanged_by_gathers(deltas: dict[str, Any]) -> None:
    """The O(numel) gathers (bitdelta group scales, uniform qmin/qstep) decode exactly like the reference layout."""
    from deltahub.codecs._quant import dequantize_uniform

    codes = torch.randint(0, 4, (1000,))
    mins, steps = torch.randn(16).to(torch.float16), torch.rand(16).to(torch.float16)
    norm = torch.tensor([0.37])
    ref = ((steps.float().repeat_interleave(64)[:1000] * codes.float()) + mins.float().repeat_interleave(64)[:1000]) * norm
    assert torch.equal(dequantize_uniform(codes, mins, steps, norm, 64), ref)
    assert math.isfinite(float(ref.sum()))


@pytest.mark.parametrize("dtype", ["uint8", "int64", "bool"])
def test_delta_codec_on_integer_dtype_refused(deltas: dict[str, Any], tmp_path: Path, dtype: str) -> None:
    """A delta codec's output is base + a float delta: an integer dtype in the entry would be silently rounded."""
    d = _mutated(deltas, "bitdelta-row", tmp_path, lambda m: m["tensors"][TARGET].__setitem__("dtype", dtype))
    with pytest.raises(ManifestError, match="floating-point") as ei:
        Delta(d)
    assert TARGET in _one_line(ei.value)


@pytest.mark.parametrize("damage", ["trailing", "two_frames", "truncated", "checksum", "size", "no_size", "garbage"])
def test_streamed_zstd_frame_is_checked_like_a_whole_one(damage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """raw's in-place rebuild decompresses its frame in pieces (:func:`deltahub.codecs._zstd.stream_frame`): a
    frame the whole-frame reader refuses is refused too (one-line CodecError), and a good one streams its bytes."""
    import zstandard

    import deltahub.codecs._zstd as zs
    from deltahub.errors import CodecError

    monkeypatch.setattr(zs, "STREAM_IN", 64)
    data = bytes(range(256)) * 40
    good = zs.compress(data, 3).numpy().tobytes()
    assert b"".join(zs.stream_frame(memoryview(good), what="w", size=len(data))) == data
    bad = {"trailing": good + b"\0", "two_frames": good + good, "truncated": good[:-9],
           "checksum": good[:-1] + bytes([good[-1] ^ 1]), "size": good, "garbage": b"not a frame at all",
           "no_size": zstandard.ZstdCompressor(write_content_size=False).compressobj().compress(data) +
           zstandard.ZstdCompressor(write_content_size=False).compressobj().flush()}[damage]
    size = len(data) + 1 if damage == "size" else len(data)
    with pytest.raises(CodecError):
        list(zs.stream_frame(memoryview(bad), what="w", size=size))
    with pytest.raises(CodecError):
        zs.decompress_frame(bad, what="w", size=size)
