"""`deltahub eval`: held-out quality of base / fine-tune / rebuild, per-tensor and per-layer error and bits,
JSON schema, PNG plot, one-line errors, and the "Measured quality" table of the pushed model card."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import HfApi, hf_hub_download
from typer.testing import CliRunner

from conftest import make_tiny_pair
from deltahub.cli import app
from deltahub.compression import compress
from deltahub.errors import DeltaHubError, MissingFileError
from deltahub.eval import EvalError, evaluate_delta, layer_of, report_json, save_plot
from deltahub.hub import push_to_hub
from deltahub.policy import Policy
from deltahub.testing.fixtures import configure_hf_client, hub_env, hub_server, hub_server_factory  # noqa: F401
from deltahub.testing.hub_server import HubServer

runner = CliRunner()
TEXT = ("def add(a, b):\n    return a + b\n\nclass Stack:\n    def __init__(self):\n        self.items = []\n" * 12)


def _byte_tokenizer(directory: Path) -> None:
    """A 256-token byte-level BPE tokenizer (no merges), saved like any transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(directory)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    base, ft = make_tiny_pair(root, vocab=256, delta_std=3e-2)
    _byte_tokenizer(base)
    _byte_tokenizer(ft)
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    compress(base, ft, root / "raw", policy=Policy(codec="raw"), progress=False)
    compress(base, ft, root / "bitdelta", codec="bitdelta", progress=False)
    return {"base": base, "ft": ft, "raw": root / "raw", "bitdelta": root / "bitdelta", "text": root / "text.txt", "root": root}


def _eval(setup: dict[str, Path], which: str, **kw: Any) -> dict[str, Any]:
    return evaluate_delta(setup[which], base=setup["base"], finetuned=setup["ft"], text=setup["text"],
                          block_size=32, max_blocks=6, **kw)


@pytest.fixture(scope="module")
def raw_report(setup: dict[str, Path]) -> dict[str, Any]:
    return _eval(setup, "raw")


@pytest.fixture(scope="module")
def bd_report(setup: dict[str, Path]) -> dict[str, Any]:
    return _eval(setup, "bitdelta")


def test_exact_delta_is_lossless(raw_report: dict[str, Any]) -> None:
    r = raw_report
    assert r["schema"] == "deltahub-eval/1"
    assert r["tokens"] == 6 * 31 and r["blocks"] == 6 and r["block_size"] == 32
    assert r["kl"] == pytest.approx(0.0, abs=1e-9)
    assert r["top1_agreement"] == 1.0
    assert r["models"]["rebuilt"]["loss"] == pytest.approx(r["models"]["finetuned"]["loss"], abs=1e-9)
    assert r["kl_base"] > 0
    assert r["gain_kept"] == pytest.approx(1.0, abs=1e-6)
    assert all(t["rel_error"] == 0.0 for t in r["tensors"])
    assert all(t["codec"] in ("raw", "unchanged") for t in r["tensors"])
    assert r["totals"]["rel_error"] == 0.0


def test_bitdelta_numbers_are_consistent(bd_report: dict[str, Any], raw_report: dict[str, Any]) -> None:
    r = bd_report
    assert r["kl"] > 0 and 0 < r["top1_agreement"] <= 1
    assert r["models"]["base"] == raw_report["models"]["base"] and r["models"]["finetuned"] == raw_report["models"]["finetuned"]
    coded = [t for t in r["tensors"] if t["codec"] == "bitdelta"]
    assert coded and all(0 < t["rel_error"] < 1 for t in coded)
    assert all(t["rel_error"] == 0.0 for t in r["tensors"] if t["codec"] in ("raw", "unchanged"))
    for t in r["tensors"]:
        assert t["bits_per_weight"] == pytest.approx(t["stored_bytes"] * 8 / t["parameters"])
        assert t["rel_error"] == pytest.approx(t["error_norm"] / t["delta_norm"] if t["delta_norm"] else 0.0)
    # layer sums: parameters and bytes add up, errors are sqrt(sum err^2 / sum delta^2)
    layers = {row["layer"]: row for row in r["layers"]}
    assert [row["index"] for row in r["layers"] if row["index"] is not None] == [0, 1]
    assert {"embeddings", "norms"} <= set(layers)
    assert sum(row["parameters"] for row in r["layers"]) == r["totals"]["parameters"]
    assert sum(row["stored_bytes"] for row in r["layers"]) == r["totals"]["stored_bytes"]
    l0 = [t for t in r["tensors"] if t["layer"] == "layer 0"]
    err = math.sqrt(sum(t["error_norm"] ** 2 for t in l0) / sum(t["delta_norm"] ** 2 for t in l0))
    assert layers["layer 0"]["rel_error"] == pytest.approx(err)
    assert layers["layer 0"]["bits_per_weight"] < 2 < layers["embeddings"]["bits_per_weight"]


def test_layer_of() -> None:
    assert layer_of("model.layers.12.mlp.up_proj.weight") == ("layer 12", 12)
    assert layer_of("transformer.h.3.attn.c_attn.weight") == ("layer 3", 3)
    assert layer_of("model.embed_tokens.weight") == ("embeddings", None)
    assert layer_of("lm_head.weight") == ("lm_head", None)
    assert layer_of("model.norm.weight") == ("norms", None)
    assert layer_of("score.bias") == ("other", None)


def test_cli_json_plot_and_table(setup: dict[str, Path], tmp_path: Path) -> None:
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    res = runner.invoke(app, ["eval", str(setup["bitdelta"]), "--base", str(setup["base"]), "--finetuned", str(setup["ft"]),
                              "--text", str(setup["text"]), "--block-size", "32", "--max-blocks", "4",
                              "--json", str(out), "--plot", str(png), "-q"])
    assert res.exit_code == 0, res.output
    assert "rebuilt" in res.output and "layer 1" in res.output and "top-1" in res.output
    data = json.loads(out.read_text())
    assert {"schema", "models", "kl", "kl_base", "top1_agreement", "gain_kept", "tokens", "blocks", "block_size",
            "tensors", "layers", "totals", "seconds", "delta", "base", "finetuned", "text"} <= set(data)
    assert set(data["models"]) == {"base", "finetuned", "rebuilt"}
    assert set(data["models"]["base"]) == {"loss", "perplexity"}
    assert {"name", "layer", "codec", "shape", "parameters", "stored_bytes", "bits_per_weight", "delta_norm",
            "error_norm", "rel_error"} <= set(data["tensors"][0])
    assert {"layer", "index", "tensors", "parameters", "stored_bytes", "bits_per_weight", "rel_error"} <= set(data["layers"][0])
    assert data["tokens"] == 4 * 31
    blob = png.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 10_000
    # the manifest's base is the default; --json - prints JSON only
    res = runner.invoke(app, ["eval", str(setup["raw"]), "--finetuned", str(setup["ft"]), "--text", str(setup["text"]),
                              "--block-size", "32", "--max-blocks", "2", "--json", "-", "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["kl"] == pytest.approx(0.0, abs=1e-9)


def test_json_has_no_infinities() -> None:
    report = {"a": math.inf, "b": [math.nan, 1.0]}
    assert json.loads(report_json(report)) == {"a": None, "b": [None, 1.0]}


def test_errors_are_one_line(setup: dict[str, Path], tmp_path: Path) -> None:
    common = ["--base", str(setup["base"]), "--finetuned", str(setup["ft"]), "--block-size", "32"]
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    for text, needle in ((tmp_path / "missing.txt", "not found"), (empty, "empty"), (binary, "not UTF-8")):
        res = runner.invoke(app, ["eval", str(setup["raw"]), *common, "--text", str(text)])
        assert res.exit_code == 1, res.output
        assert needle in res.output and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1
    with pytest.raises(MissingFileError):
        evaluate_delta(setup["raw"], base=setup["base"], finetuned=setup["ft"], text=tmp_path / "missing.txt")


def test_tokenizer_missing_and_vocab_mismatch(setup: dict[str, Path], tmp_path: Path) -> None:
    base, ft = make_tiny_pair(tmp_path / "notok", vocab=256)
    compress(base, ft, tmp_path / "d", codec="bitdelta", progress=False)
    with pytest.raises(EvalError, match="no tokenizer"):
        evaluate_delta(tmp_path / "d", base=base, finetuned=ft, text=setup["text"], block_size=32)
    res = runner.invoke(app, ["eval", str(tmp_path / "d"), "--base", str(base), "--finetuned", str(ft),
                              "--text", str(setup["text"]), "--block-size", "32"])
    assert res.exit_code == 1 and "no tokenizer" in res.output and len(res.output.strip().splitlines()) == 1
    # a model with a smaller vocabulary than the tokenizer's ids
    small_base, small_ft = make_tiny_pair(tmp_path / "small", vocab=64)
    _byte_tokenizer(small_ft)
    compress(small_base, small_ft, tmp_path / "ds", codec="bitdelta", progress=False)
    with pytest.raises(EvalError, match="vocabulary"):
        evaluate_delta(tmp_path / "ds", base=small_base, finetuned=small_ft, text=setup["text"], block_size=32)
    # the fine-tune of another vocabulary size than the delta
    with pytest.raises(DeltaHubError):
        evaluate_delta(setup["raw"], base=setup["base"], finetuned=small_ft, text=setup["text"], block_size=32)


def test_block_size_over_context_is_an_error(setup: dict[str, Path]) -> None:
    with pytest.raises(EvalError, match="max_position_embeddings"):
        evaluate_delta(setup["raw"], base=setup["base"], finetuned=setup["ft"], text=setup["text"], block_size=128)


def test_plot_without_layers_is_an_error(bd_report: dict[str, Any], tmp_path: Path) -> None:
    report = {**bd_report, "layers": [r for r in bd_report["layers"] if r["index"] is None]}
    with pytest.raises(EvalError, match="nothing to plot"):
        save_plot(report, tmp_path / "x.png")


def test_push_with_eval_text_puts_the_table_into_the_card(hub_env: HubServer,  # noqa: F811
                                                            setup: dict[str, Path], tmp_path: Path) -> None:
    res = runner.invoke(app, ["push", str(setup["bitdelta"]), "me/evaluated", "--eval-text", str(setup["text"]),
                              "--finetuned", str(setup["ft"]), "--base", str(setup["base"]), "--block-size", "32",
                              "--max-blocks", "3", "-q"])
    assert res.exit_code == 0, res.output
    card = Path(hf_hub_download("me/evaluated", "README.md")).read_text(encoding="utf-8")
    assert "## Measured quality" in card and "| rebuilt (base + this delta) |" in card and "KL(fine-tune" in card
    assert "model-index" in card and "perplexity" in card
    assert "## Storage cost" in card
    assert "| 2 transformer blocks (error: per block) |" in card and "| embeddings |" in card and "| **total** |" in card
    # the Python API, without a fine-tune: base and rebuilt only
    push_to_hub(setup["raw"], "me/evaluated-raw", eval_text=setup["text"], base_model=setup["base"],
                eval_kwargs={"block_size": 32, "max_blocks": 2})
    card = Path(hf_hub_download("me/evaluated-raw", "README.md")).read_text(encoding="utf-8")
    assert "## Measured quality" in card and "| base |" in card and "| fine-tune |" not in card
    assert "without the fine-tune" in card
    # --finetuned without --eval-text: one-line error, nothing pushed
    res = runner.invoke(app, ["push", str(setup["raw"]), "me/other", "--finetuned", str(setup["ft"])])
    assert res.exit_code == 1 and "--eval-text" in res.output
    assert "me/other" not in {m.id for m in HfApi().list_models(author="me")}


def test_eval_with_hub_ids(hub_env: HubServer, setup: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    """DELTA and --finetuned as Hub ids; the base is the one the manifest pins (downloaded at its commit)."""
    api = HfApi()
    for repo, folder in (("org/base", setup["base"]), ("org/ft", setup["ft"])):
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo)
    compress("org/base", "org/ft", tmp_path / "delta", codec="bitdelta", progress=False, cache_dir=tmp_path / "c")
    push_to_hub(tmp_path / "delta", "me/hub-delta")
    res = runner.invoke(app, ["eval", "me/hub-delta", "--finetuned", "org/ft", "--text", str(setup["text"]),
                              "--block-size", "32", "--max-blocks", "2", "--json", "-", "-q"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["base"] == "org/base" and data["finetuned"] == "org/ft" and data["kl"] > 0
    assert data["tokens"] == 2 * 31


def test_own_card_gets_its_quality_section_replaced(raw_report: dict[str, Any]) -> None:
    from deltahub.hub._card import with_quality_section

    card = "---\nlibrary_name: deltahub\n---\n# mine\n\n## Measured quality\n\nold numbers\n\n## Notes\n\nkeep me\n"
    out = with_quality_section(card, raw_report)
    assert out.count("## Measured quality") == 1 and "old numbers" not in out and "keep me" in out and "# mine" in out
    appended = with_quality_section("# plain card\n", raw_report)
    assert appended.startswith("# plain card\n\n## Measured quality")
