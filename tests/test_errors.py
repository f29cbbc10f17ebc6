"""Every expected failure is a typed DeltaHubError naming the file and the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_tiny_pair
from deltahub.compression import compress
from deltahub.delta import Delta, apply_delta
from deltahub.errors import (
    CorruptFileError,
    DeltaHubError,
    ManifestError,
    MissingFileError,
    ShapeMismatchError,
    UnsupportedFormatError,
)
from deltahub.format.integrity import manifest_bytes


@pytest.fixture
def delta_dir(tmp_path: Path) -> tuple[Path, Path, Path]:
    base, ft = make_tiny_pair(tmp_path)
    compress(base, ft, tmp_path / "delta", codec="bitdelta", progress=False)
    return base, ft, tmp_path / "delta"


def _edit_manifest(d: Path, fn) -> None:  # type: ignore[no-untyped-def]
    p = d / "delta_config.json"
    m = json.loads(p.read_text())
    fn(m)
    p.write_bytes(manifest_bytes(m))  # re-sealed: these tests are about the edited field, not the digest


def test_missing_model_dir(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="not found") as exc:
        compress(tmp_path / "nope", tmp_path / "nope2", tmp_path / "out", codec="bitdelta", progress=False)
    assert "nope" in str(exc.value)


def test_dir_without_weights(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match="no safetensors weights"):
        compress(tmp_path / "empty", tmp_path / "empty", tmp_path / "out", codec="bitdelta", progress=False)


def test_not_a_delta(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="delta_config.json"):
        Delta(tmp_path)


def test_truncated_safetensors(tmp_path: Path, delta_dir: tuple[Path, Path, Path]) -> None:
    base, ft, d = delta_dir
    f = ft / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptFileError, match="truncated") as exc:
        compress(base, ft, tmp_path / "out2", codec="bitdelta", progress=False)
    assert "model.safetensors" in str(exc.value)
    f.write_bytes(b"\x05")
    with pytest.raises(CorruptFileError, match="too short"):
        compress(base, ft, tmp_path / "out3", codec="bitdelta", progress=False)
    f.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(CorruptFileError, match="header claims"):
        compress(base, ft, tmp_path / "out4", codec="bitdelta", progress=False)


def test_truncated_delta_file(delta_dir: tuple[Path, Path, Path]) -> None:
    _, _, d = delta_dir
    f = d / "delta.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CorruptFileError, match="delta.safetensors"):
        Delta(d)


def test_unknown_major_version(delta_dir: tuple[Path, Path, Path]) -> None:
    _, _, d = delta_dir
    _edit_manifest(d, lambda m: m.update(format_version="2.0"))
    with pytest.raises(UnsupportedFormatError, match="2.0 is not supported") as exc:
        Delta(d)
    assert "delta_config.json" in str(exc.value)


def test_newer_minor_version_is_read(delta_dir: tuple[Path, Path, Path]) -> None:
    _, _, d = delta_dir
    _edit_manifest(d, lambda m: m.update(format_version="1.7", some_future_field={"x": 1}))
    assert Delta(d).manifest.format_version == "1.7"


def test_other_format_and_bad_json(delta_dir: tuple[Path, Path, Path]) -> None:
    _, _, d = delta_dir
    _edit_manifest(d, lambda m: m.update(format="peft"))
    with pytest.raises(UnsupportedFormatError, match="not a deltahub manifest"):
        Delta(d)
    (d / "delta_config.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        Delta(d)


def test_unknown_codec(delta_dir: tuple[Path, Path, Path]) -> None:
    _, _, d = delta_dir
    _edit_manifest(d, lambda m: m["tensors"]["model.norm.weight"].update(codec="quantum"))
    with pytest.raises(UnsupportedFormatError, match="'quantum'"):
        Delta(d)


def test_manifest_names_missing_tensor(delta_dir: tuple[Path, Path, Path]) -> None:
    _, _, d = delta_dir
    name = "model.layers.0.mlp.up_proj.weight"
    _edit_manifest(d, lambda m: m["tensors"][name]["stored"].update(sign="nowhere.sign"))
    with pytest.raises(ManifestError, match="nowhere.sign"):
        Delta(d)


def test_manifest_missing_field(delta_dir: tuple[Path, Path, Path]) -> None:
    _, _, d = delta_dir
    _edit_manifest(d, lambda m: m.pop("base"))
    with pytest.raises(ManifestError, match="base"):
        Delta(d)


def test_shape_mismatch_in_manifest(tmp_path: Path, delta_dir: tuple[Path, Path, Path]) -> None:
    base, _, d = delta_dir
    name = "model.layers.0.mlp.up_proj.weight"
    _edit_manifest(d, lambda m: m["tensors"][name].update(shape=[64, 31]))
    with pytest.raises(ShapeMismatchError, match="shape"):
        apply_delta(d, base, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_all_errors_share_the_base_class() -> None:
    for cls in (CorruptFileError, ManifestError, MissingFileError, ShapeMismatchError, UnsupportedFormatError):
        assert issubclass(cls, DeltaHubError)
