"""The CLI: verbs work end to end; expected failures are one line and exit code 1."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from conftest import make_tiny_pair
from deltahub.cli import app
from deltahub.format.spec import FORMAT_VERSION

runner = CliRunner()


def test_compress_info_apply(tmp_path: Path) -> None:
    base, ft = make_tiny_pair(tmp_path)
    r = runner.invoke(app, ["compress", str(base), str(ft), "-o", str(tmp_path / "d"), "--codec", "bitdelta", "--scale-granularity", "row", "-q"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "d" / "delta_config.json").read_text())
    assert m["tensors"]["model.layers.0.mlp.up_proj.weight"]["params"] == {"granularity": "row"}
    r = runner.invoke(app, ["info", str(tmp_path / "d")])
    assert r.exit_code == 0 and "bitdelta" in r.output and "total" in r.output
    r = runner.invoke(app, ["info", str(tmp_path / "d"), "--json"])
    assert json.loads(r.output)["format_version"] == FORMAT_VERSION
    r = runner.invoke(app, ["apply", str(tmp_path / "d"), "--base", str(base), "-o", str(tmp_path / "out"), "-q"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "config.json").exists()


def test_group_and_rules_flags(tmp_path: Path) -> None:
    base, ft = make_tiny_pair(tmp_path)
    r = runner.invoke(app, ["compress", str(base), str(ft), "-o", str(tmp_path / "d"), "--codec", "bitdelta", "--group-size", "16",
                            "--rule", "*.down_proj.weight=raw", "--exclude", "*.o_proj.*", "-q"])
    assert r.exit_code == 0, r.output
    t = json.loads((tmp_path / "d" / "delta_config.json").read_text())["tensors"]
    assert t["model.layers.0.mlp.up_proj.weight"]["params"] == {"granularity": "group", "group_size": 16}
    assert t["model.layers.0.mlp.down_proj.weight"]["codec"] == "raw"
    assert t["model.layers.0.self_attn.o_proj.weight"]["codec"] == "raw"


def test_errors_are_one_line(tmp_path: Path) -> None:
    r = runner.invoke(app, ["apply", str(tmp_path / "missing"), "--base", str(tmp_path), "-o", str(tmp_path / "o")])
    assert r.exit_code == 1
    assert "error:" in r.output and "Traceback" not in r.output
    base, ft = make_tiny_pair(tmp_path)
    # --codec and --scale-granularity are choices: a usage error (exit 2) naming the valid values
    r = runner.invoke(app, ["compress", str(base), str(ft), "-o", str(tmp_path / "d"), "--codec", "nope"])
    assert r.exit_code == 2 and "nope" in r.output and "bitdelta" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["compress", str(base), str(ft), "-o", str(tmp_path / "d"), "--codec", "bitdelta", "--scale-granularity", "col"])
    assert r.exit_code == 2 and "col" in r.output and "tensor" in r.output
    r = runner.invoke(app, ["compress", str(base), str(ft), "-o", str(tmp_path / "d"), "--rule", "*=nope"])
    assert r.exit_code == 1 and "unknown codec 'nope'" in r.output
    r = runner.invoke(app, ["compress", str(base), str(ft), "-o", str(tmp_path / "d"), "--codec", "bitdelta", "-p", "granularity=col"])
    assert r.exit_code == 1 and "granularity" in r.output
    runner.invoke(app, ["compress", str(base), str(ft), "-o", str(tmp_path / "d"), "-q"])
    r = runner.invoke(app, ["compress", str(base), str(ft), "-o", str(tmp_path / "d"), "-q"])
    assert r.exit_code == 1 and "already exists" in r.output
    other, _ = make_tiny_pair(tmp_path / "x", seed=5)
    r = runner.invoke(app, ["apply", str(tmp_path / "d"), "--base", str(other), "-o", str(tmp_path / "o"), "-q"])
    assert r.exit_code == 1 and "sha256" in r.output and not (tmp_path / "o").exists()


def test_codecs_and_version() -> None:
    r = runner.invoke(app, ["codecs"])
    assert r.exit_code == 0 and "bitdelta" in r.output
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and "deltahub" in r.output


def test_info_shows_bytes_by_part_of_the_model(tmp_path: Path) -> None:
    from deltahub.report import tensor_group

    assert tensor_group("model.embed_tokens.weight", [10, 4]) == tensor_group("lm_head.weight", [10, 4]) == "embeddings / LM head"
    assert tensor_group("model.layers.0.self_attn.q_proj.weight", [4, 4]) == "attention"
    assert tensor_group("transformer.h.0.mlp.c_fc.weight", [4, 4]) == "MLP"
    assert tensor_group("model.layers.0.input_layernorm.weight", [4]) == "norms and other"
    assert tensor_group("model.layers.0.self_attn.q_proj.bias", [4]) == "norms and other"
    base, ft = make_tiny_pair(tmp_path)
    (ft / "tokenizer.json").write_text('{"version": "1.0"}\n')
    runner.invoke(app, ["compress", str(base), str(ft), "-o", str(tmp_path / "d"), "--codec", "bitdelta", "-q"])
    r = runner.invoke(app, ["info", str(tmp_path / "d")], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "bytes by part of the model" in r.output and "whole delta" in r.output
    assert "generation_config.json" in r.output  # taken from the base, shown as such
    groups = {g["group"]: g for g in json.loads(runner.invoke(app, ["info", str(tmp_path / "d"), "--json"]).output)["groups"]}
    on_disk = sum(p.stat().st_size for p in (tmp_path / "d").iterdir())
    assert groups["whole delta"]["bytes"] == on_disk
    assert groups["aux files (tokenizer, ...)"]["bytes"] == (tmp_path / "d" / "tokenizer.json").stat().st_size
    assert groups["embeddings / LM head"]["tensors"] == 1 and groups["attention"]["tensors"] == 8


def test_paths_the_os_refuses_are_one_line_errors(tmp_path: Path) -> None:
    """A path argument the OS cannot open (a name longer than NAME_MAX, or a whole path over PATH_MAX) ends in one
    typed error line naming it, for every verb that reads one, never a traceback."""
    base, ft = make_tiny_pair(tmp_path)
    runner.invoke(app, ["compress", str(base), str(ft), "-o", str(tmp_path / "d"), "--codec", "bitdelta", "-q"])
    for bad in ("d" * 300, "a/" * 3000):
        for args in (["compress", bad, str(ft), "-o", str(tmp_path / "o")], ["compress", str(base), bad, "-o", str(tmp_path / "o")],
                     ["apply", bad, "--base", str(base), "-o", str(tmp_path / "o")],
                     ["apply", str(tmp_path / "d"), "--base", bad, "-o", str(tmp_path / "o")], ["info", bad]):
            r = runner.invoke(app, args)
            assert r.exit_code == 1, (args[0], r.output[-300:])
            assert r.output.startswith("error:") and "Traceback" not in r.output and "too long" in r.output, r.output[-300:]
            assert not (tmp_path / "o").exists()
