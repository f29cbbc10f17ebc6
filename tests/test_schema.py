"""deltahub/format/delta_config.schema.json (JSON Schema 2020-12) accepts the manifests deltahub writes, for every
codec, and refuses malformed ones."""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

jsonschema = pytest.importorskip("jsonschema")

from conftest import make_tiny_pair  # noqa: E402

from deltahub.compression import compress  # noqa: E402
from deltahub.format.spec import NAME_TO_DTYPE  # noqa: E402

CASES: list[tuple[str, dict[str, Any]]] = [
    ("bitdelta", {"granularity": "row"}),
    ("bitdelta", {"granularity": "group", "group_size": 16}),
    ("raw", {}),
    ("raw", {"zstd_level": 0}),
    ("raw", {"mode": "full", "shuffle": False}),
    ("deltadq", {"preset": "16x"}),
    ("deltadq", {"p": 0.5, "bits": 3, "parts": 1, "quantizer": "uniform", "qgroup": 32, "entropy": "none"}),
    ("dare", {"p": 0.5}),
    ("dare", {"dtype": "bfloat16"}),
    ("topk-ternary", {"density": 0.2}),
    ("topk-ternary", {"density": 0.01, "mask_encoding": "indices"}),
    ("rowsparse", {"density": 0.5, "bits": 2}),
    ("rowsparse", {"bits": 4, "group_size": 8, "entropy": "zstd"}),
    ("lowrank", {"rank": 4}),
    ("lowrank", {"rank": 2, "dtype": "bfloat16"}),
    ("lowrank-mp", {"preset": "r4"}),
    ("lowrank-residual", {"rank": 2}),
]


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    text = resources.files("deltahub.format").joinpath("delta_config.schema.json").read_text(encoding="utf-8")
    s = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(s)
    return s


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_tiny_pair(tmp_path_factory.mktemp("pair"), vocab=96)


@pytest.fixture(scope="module")
def manifests(pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    base, ft = pair
    out = []
    for i, (codec, params) in enumerate(CASES):
        d = tmp_path_factory.mktemp(f"delta{i}")
        compress(base, ft, d, codec=codec, params=params, overwrite=True, progress=False)
        out.append(json.loads((d / "delta_config.json").read_text()))
    # Sharded, with a resized vocabulary (raw 'full' against a base tensor of another shape).
    resized_base, _ = make_tiny_pair(tmp_path_factory.mktemp("resized"), vocab=128)
    d = tmp_path_factory.mktemp("sharded")
    compress(resized_base, ft, d, codec="bitdelta", overwrite=True, progress=False, max_shard_size=1_000)
    out.append(json.loads((d / "delta_config.json").read_text()))
    return out


def _errors(schema: dict[str, Any], manifest: Any) -> list[str]:
    v = jsonschema.Draft202012Validator(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in v.iter_errors(manifest)]


def test_written_manifests_validate(schema: dict[str, Any], manifests: list[dict[str, Any]]) -> None:
    seen: set[str] = set()
    for m in manifests:
        assert _errors(schema, m) == []
        seen |= {e["codec"] for e in m["tensors"].values()}
    assert seen == {"bitdelta", "raw", "unchanged", "deltadq", "dare", "topk-ternary", "rowsparse", "lowrank", "lowrank-mp",
                    "lowrank-residual"}
    sharded = manifests[-1]
    assert "delta.safetensors.index.json" in sharded["files"]
    assert any(e["codec"] == "raw" and e["params"]["mode"] == "full" and "base_sha256" in e for e in sharded["tensors"].values())


def test_schema_dtypes_are_the_spec_table(schema: dict[str, Any]) -> None:
    assert set(schema["$defs"]["dtype"]["enum"]) == set(NAME_TO_DTYPE)


def _entry(m: dict[str, Any], codec: str) -> dict[str, Any]:
    return next(e for e in m["tensors"].values() if e["codec"] == codec)


BREAKS = {
    "wrong format": lambda m: m.update(format="safetensors"),
    "major version 2": lambda m: m.update(format_version="2.0"),
    "no manifest digest": lambda m: m.pop("manifest_digest"),
    "uppercase digest": lambda m: m.update(manifest_digest=m["manifest_digest"].upper()),
    "md5 digest": lambda m: m.update(manifest_digest="md5:" + "0" * 32),
    "short fingerprint": lambda m: m["base"].update(fingerprint="sha256:abc"),
    "path in files": lambda m: m["files"].append("../evil.json"),
    "hidden file": lambda m: m["files"].append(".env"),
    "code in files": lambda m: m["files"].append("modeling_evil.py"),
    "weights in files": lambda m: m["files"].append("pytorch_model.BIN"),
    "negative dim": lambda m: _entry(m, "bitdelta").update(shape=[-1, 4]),
    "bool dim": lambda m: _entry(m, "bitdelta").update(shape=[True, 4]),
    "huge dim": lambda m: _entry(m, "bitdelta").update(shape=[2**41]),
    "unknown dtype": lambda m: _entry(m, "bitdelta").update(dtype="complex64"),
    "unknown codec": lambda m: _entry(m, "bitdelta").update(codec="lora"),
    "bad granularity": lambda m: _entry(m, "bitdelta")["params"].update(granularity="column"),
    "group without size": lambda m: _entry(m, "bitdelta").update(params={"granularity": "group"}),
    "missing stored role": lambda m: _entry(m, "bitdelta")["stored"].pop("scale"),
    "no base_sha256": lambda m: _entry(m, "bitdelta").pop("base_sha256"),
    "no tensor digests": lambda m: _entry(m, "bitdelta").pop("digests"),
    "bad base_sha256": lambda m: _entry(m, "bitdelta").update(base_sha256="XYZ"),
    "unchanged with params": lambda m: _entry(m, "unchanged").update(params={"x": 1}),
}


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_invalid_manifests_fail(schema: dict[str, Any], manifests: list[dict[str, Any]], name: str) -> None:
    m = copy.deepcopy(manifests[0])  # bitdelta (row) + unchanged norms
    BREAKS[name](m)
    assert _errors(schema, m), f"schema accepted a manifest with {name}"


@pytest.mark.parametrize(
    "index, change",
    [
        (2, lambda e: e["params"].update(zstd_level=0)),  # zstd payload under a level-0 (data) entry
        (3, lambda e: e["params"].update(mode="auto")),  # 'auto' is writer input, never recorded
        (5, lambda e: e["params"].update(parts=3)),  # not a power of two
        (5, lambda e: e["params"].update(qgroup=64)),  # qgroup only with the uniform quantizer
        (5, lambda e: e["params"].update(group_size="auto")),  # writers record the integer chosen
        (6, lambda e: e["params"].pop("qgroup")),
        (7, lambda e: e["params"].update(p=1.0)),
        (7, lambda e: e["params"].update(seed=2**32)),
        (9, lambda e: e["params"].update(mask_encoding="auto")),  # writers record the encoding used
        (9, lambda e: e["params"].update(density=0)),
    ],
)
def test_invalid_codec_params_fail(schema: dict[str, Any], manifests: list[dict[str, Any]], index: int, change: Any) -> None:
    m = copy.deepcopy(manifests[index])
    codec = CASES[index][0]
    change(_entry(m, codec))
    assert _errors(schema, m)


@pytest.fixture(scope="module")
def tied_manifest(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A delta of a checkpoint that stores the LM head with the embedding's bytes: one ``alias`` entry (format 1.3)."""
    from safetensors.torch import load_file, save_file

    base, ft = make_tiny_pair(tmp_path_factory.mktemp("tied"), vocab=96)
    for p in (base, ft):
        sd = load_file(str(p / "model.safetensors"))
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
        save_file(sd, str(p / "model.safetensors"), metadata={"format": "pt"})
    d = tmp_path_factory.mktemp("tied-delta")
    compress(base, ft, d, codec="bitdelta", overwrite=True, progress=False)
    return json.loads((d / "delta_config.json").read_text())


ALIAS_BREAKS = {
    "stores a tensor": lambda e: e.update(stored={"data": "lm_head.weight.data"}),
    "has digests": lambda e: e.update(digests={"data": "sha256:" + "0" * 64}),
    "no target": lambda e: e.update(params={}),
    "empty target": lambda e: e.update(params={"target": ""}),
    "target not a string": lambda e: e.update(params={"target": 3}),
    "extra param": lambda e: e["params"].update(rows=2),
    "no params": lambda e: e.pop("params"),
}


def test_tied_manifest_validates(schema: dict[str, Any], tied_manifest: dict[str, Any]) -> None:
    assert _errors(schema, tied_manifest) == []
    assert [e["params"] for e in tied_manifest["tensors"].values() if e["codec"] == "alias"] == [
        {"target": next(n for n in tied_manifest["tensors"] if n in ("lm_head.weight", "model.embed_tokens.weight"))}]


@pytest.mark.parametrize("name", sorted(ALIAS_BREAKS))
def test_invalid_alias_entries_fail(schema: dict[str, Any], tied_manifest: dict[str, Any], name: str) -> None:
    m = copy.deepcopy(tied_manifest)
    ALIAS_BREAKS[name](_entry(m, "alias"))
    assert _errors(schema, m), f"schema accepted an alias entry that {name}"
