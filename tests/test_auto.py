"""--preset, --codec auto with a byte budget, and calibration activations (library + CLI)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_tiny_pair
from deltahub.calibration import CalibrationFile, collect_activations, load_calibration, save_calibration
from deltahub.cli import app
from deltahub.codecs.deltadq import PRESETS, choose_group_size
from deltahub.compression import compress
from deltahub.delta import apply_delta
from deltahub.errors import CodecError, CorruptFileError, InvalidCodecParamsError, ShapeMismatchError
from deltahub.format.io import Checkpoint
from deltahub.policy import Policy, Rule, check_preset

runner = CliRunner()
# A few settings from ~8x to ~100x: keeps the tests fast (the default list has 18).
CANDS = [("bitdelta", {"granularity": "row"}), ("bitdelta", {"granularity": "tensor"}), ("deltadq", {"preset": "16x"}),
         ("topk-ternary", {"density": 0.1}), ("topk-ternary", {"density": 0.02}), ("topk-ternary", {"density": 0.01})]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_tiny_pair(tmp_path_factory.mktemp("pair"))


def _tensors(d: Path) -> dict[str, dict]:
    return json.loads((d / "delta_config.json").read_text())["tensors"]


def _auto(d: Path) -> dict[str, dict]:
    return {k: e for k, e in _tensors(d).items() if "auto_choice" in e.get("stats", {})}


def _one_error_line(r) -> bool:  # noqa: ANN001
    lines = r.output.strip().splitlines()
    return r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.output


def test_preset_cli_sets_deltadq_params(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    r = runner.invoke(app, ["compress", str(base), str(ft), "-o", str(tmp_path / "d"), "--codec", "deltadq", "--preset", "64x", "-q"])
    assert r.exit_code == 0, r.output
    t = _tensors(tmp_path / "d")
    dq = [e for e in t.values() if e["codec"] == "deltadq"]
    assert len(dq) == 14  # every transformer-block matrix of the tiny Llama
    for e in dq:
        assert {k: e["params"][k] for k in PRESETS["64x"]} == PRESETS["64x"]
    assert t["model.embed_tokens.weight"]["codec"] == "raw"


def test_preset_errors(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    r = runner.invoke(app, ["compress", str(base), str(ft), "-o", str(tmp_path / "d"), "--preset", "16x"])
    assert _one_error_line(r) and "needs a named codec" in r.output and "deltadq (16x, 32x" in r.output
    r = runner.invoke(app, ["compress", str(base), str(ft), "-o", str(tmp_path / "d"), "--codec", "bitdelta", "--preset", "16x"])
    assert _one_error_line(r) and "codec 'bitdelta' has no presets" in r.output and "deltadq (16x, 32x" in r.output
    r = runner.invoke(app, ["compress", str(base), str(ft), "-o", str(tmp_path / "d"), "--codec", "deltadq", "--preset", "17x"])
    assert _one_error_line(r) and "no preset '17x'" in r.output and "512x" in r.output
    assert not (tmp_path / "d").exists()
    with pytest.raises(InvalidCodecParamsError, match="no presets"):
        check_preset("raw", "16x")
    with pytest.raises(InvalidCodecParamsError, match="needs a named codec"):
        compress(base, ft, tmp_path / "d", codec="auto", target_ratio=8, preset="16x")
    # preset through the Policy, on a deltadq rule's codec it is just a param
    pol = Policy(codec="deltadq", preset="32x", rules=[Rule.parse("*.mlp.*=deltadq:preset=128x")])
    compress(base, ft, tmp_path / "p", policy=pol, progress=False, compute_stats=False)
    t = _tensors(tmp_path / "p")
    assert t["model.layers.0.self_attn.q_proj.weight"]["params"]["p"] == PRESETS["32x"]["p"]
    assert t["model.layers.0.mlp.up_proj.weight"]["params"]["p"] == PRESETS["128x"]["p"]


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny model whose embedding (4096 x 32) is most of its weights, like a large-vocabulary model."""
    return make_tiny_pair(tmp_path_factory.mktemp("bigpair"), vocab=4096)


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir())


def _fp16_bytes(model_dir: Path) -> int:
    with Checkpoint(model_dir) as ck:
        return 2 * sum(math.prod(ck.info(n).shape) for n in ck.keys())


def test_target_ratio_makes_the_whole_directory_smaller(big_pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = big_pair
    fp16 = _fp16_bytes(ft)
    distortion = {}
    for ratio in (2, 5):
        out = tmp_path / f"r{ratio}"
        m = compress(base, ft, out, target_ratio=ratio, progress=False)
        assert _dir_bytes(out) <= fp16 / ratio  # the whole directory: tensors, headers, manifest, aux files
        auto = _auto(out)
        assert "model.embed_tokens.weight" in auto  # the whole model is allocated, the embedding included
        for name, e in auto.items():
            assert e["stats"]["auto_choice"].split(":")[0] == e["codec"] == m.tensors[name].codec
            # vocabulary matrices count noise fully (a tied embedding's noise lands on every logit)
            want = ("rel_l2",) if name == "model.embed_tokens.weight" else ("aligned_l2", "exact")
            assert e["stats"]["auto_metric"] in want, name
        distortion[ratio] = sum(e["stats"]["error_l2"] ** 2 for e in auto.values() if "error_l2" in e["stats"])
        rebuilt = apply_delta(out, base, tmp_path / f"rebuilt{ratio}", progress=False)
        assert Checkpoint(rebuilt).keys() == Checkpoint(ft).keys()
    assert distortion[2] < distortion[5]


def test_max_bytes_caps_the_directory_and_errors_when_nothing_fits(big_pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = big_pair
    for budget in (90_000, 55_000):
        out = tmp_path / f"b{budget}"
        compress(base, ft, out, max_bytes=budget, progress=False)
        assert _dir_bytes(out) <= budget
    both = compress(base, ft, tmp_path / "both", target_ratio=2, max_bytes="60kB", progress=False)
    assert _dir_bytes(tmp_path / "both") <= 60_000 and both.tensors
    with pytest.raises(CodecError, match=r"budget of 2000 bytes for the whole delta"):
        compress(base, ft, tmp_path / "none", max_bytes=2000, progress=False)
    assert not (tmp_path / "none").exists()


def test_default_policy_allocates_and_named_codec_keeps_the_bitdelta_policy(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    m = compress(base, ft, tmp_path / "default", progress=False)
    assert any("auto_choice" in e.stats for e in m.tensors.values())
    named = compress(base, ft, tmp_path / "bitdelta", codec="bitdelta", progress=False)
    assert named.tensors["model.embed_tokens.weight"].codec == "raw"
    assert named.tensors["model.layers.0.mlp.up_proj.weight"].codec == "bitdelta"


def test_auto_rule_and_cli(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    r = runner.invoke(app, ["compress", str(base), str(ft), "-o", str(tmp_path / "d"), "--codec", "bitdelta", "--rule", "*.mlp.*=auto",
                            "--max-bytes", "200kB", "--candidate", "bitdelta:granularity=row", "--candidate", "topk-ternary:density=0.1"])
    assert r.exit_code == 0, r.output
    assert "auto: chosen per tensor" in r.output and "mean error" in r.output
    t = _tensors(tmp_path / "d")
    auto = _auto(tmp_path / "d")
    assert set(auto) == {n for n in t if ".mlp." in n and n.endswith("proj.weight")}
    assert t["model.layers.0.self_attn.q_proj.weight"]["codec"] == "bitdelta"
    assert {e["stats"]["auto_choice"] for e in auto.values()} <= {"bitdelta:granularity=row", "topk-ternary:density=0.1"}
    r = runner.invoke(app, ["info", str(tmp_path / "d")])
    assert r.exit_code == 0 and "auto: chosen per tensor" in r.output
    info = json.loads(runner.invoke(app, ["info", str(tmp_path / "d"), "--json"]).output)
    assert sum(row["tensors"] for row in info["auto"]) == len(auto)
    # the contract's spelling, default candidates, size budget parsed like --max-shard-size
    r = runner.invoke(app, ["compress", str(base), str(ft), "-o", str(tmp_path / "e"), "--codec", "auto", "--max-bytes", "40kB", "-q"])
    assert r.exit_code == 0, r.output
    assert _dir_bytes(tmp_path / "e") <= 40_000


@pytest.mark.parametrize("args, message", [
    (["--target-ratio", "8", "--codec", "bitdelta"], "allocate bytes with codec 'auto'"),
    (["--max-bytes", "1MB", "--codec", "deltadq"], "allocate bytes with codec 'auto'"),
    (["--codec", "auto", "--max-bytes", "lots"], "not a size"),
    (["--codec", "auto", "--target-ratio", "0"], "target_ratio=0.0 must be a number > 0"),
    (["--codec", "auto", "--target-ratio", "8", "-p", "p=0.5"], "takes no parameters"),
    (["--rule", "*.mlp.*=auto:p=0.5", "--target-ratio", "8"], "takes no parameters"),
    (["--candidate", "bitdelta", "--codec", "bitdelta"], "--candidate only applies"),
    (["--codec", "auto", "--target-ratio", "8", "--candidate", "nope"], "unknown codec 'nope'"),
    (["--codec", "auto", "--target-ratio", "8", "--candidate", "dare:p=2"], "p=2"),
    (["--codec", "auto", "--max-bytes", "20", "--candidate", "bitdelta"], "budget of 20 bytes for the whole delta"),
])
def test_bad_flags_one_line(pair: tuple[Path, Path], tmp_path: Path, args: list[str], message: str) -> None:
    base, ft = pair
    r = runner.invoke(app, ["compress", str(base), str(ft), "-o", str(tmp_path / "d"), *args])
    assert _one_error_line(r), r.output
    assert message in r.output
    assert not (tmp_path / "d").exists()


def _tiny_tokenizer(model_dir: Path) -> None:
    """A whitespace word-level tokenizer saved next to the tiny model (ids fit its 128-token vocab)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the a of to and in is for on with that by this def return import class if else".split()
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(model_dir)


def test_collect_activations_and_round_trip(pair: tuple[Path, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base, _ = pair
    ids = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(0))
    acts = collect_activations(base, ids, max_rows=512, seq_len=64)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    linears = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(acts) == set(linears)  # lm_head.weight included even though it is tied
    for name, x in acts.items():
        assert x.dtype == torch.float32 and tuple(x.shape) == (100, linears[name].in_features)
    # the rows are the layer's real inputs: the first window's q_proj input is the first layer's normed embeddings
    seen = {}
    h = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.setdefault("x", i[0][0]))
    with torch.no_grad():
        model(input_ids=ids[:64][None], use_cache=False)
    h.remove()
    torch.testing.assert_close(acts["model.layers.0.self_attn.q_proj.weight"][:64], seen["x"])
    # evenly spread subsample of max_rows tokens: positions i * 100 // 40
    sub = collect_activations(base, ids.tolist(), max_rows=40, seq_len=64)
    pos = torch.arange(40) * 100 // 40
    torch.testing.assert_close(sub["model.layers.0.self_attn.q_proj.weight"], acts["model.layers.0.self_attn.q_proj.weight"][pos])
    assert all(x.shape[0] == 40 for x in sub.values())
    assert collect_activations(base, [ids[:30].tolist(), ids[30:].tolist()], max_tokens=50, seq_len=64)[
        "model.layers.1.mlp.down_proj.weight"].shape == (50, 64)

    path = save_calibration(sub, tmp_path / "c.safetensors")
    back = load_calibration(path)
    assert set(back) == set(sub) and all(torch.equal(back[k], sub[k]) for k in sub)
    assert "lm_head.weight" in CalibrationFile(path)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CorruptFileError, match="not a deltahub calibration file"):
        load_calibration(tmp_path / "other.safetensors")


def test_compress_with_calibration(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    ids = torch.randint(0, 128, (96,), generator=torch.Generator().manual_seed(1))
    acts = collect_activations(base, ids, seq_len=48)
    save_calibration(acts, tmp_path / "c.safetensors")
    compress(base, ft, tmp_path / "a", codec="auto", target_ratio=1.2, candidates=CANDS, calibration=tmp_path / "c.safetensors",
             progress=False)
    auto = _auto(tmp_path / "a")
    metrics = {k: e["stats"]["auto_metric"] for k, e in auto.items()}
    # every matrix is allocated; errors stay in weight space (compression.CALIBRATED_ERRORS: output-space
    # errors of some tensors are not commensurate with the weight-space errors of the others)
    assert len(auto) == 15 and metrics.pop("model.embed_tokens.weight") == "rel_l2"
    assert set(metrics.values()) == {"aligned_l2"}
    # tensors without activations get None (here: all but one) and fall back to the delta's L2 error
    one = "model.layers.1.mlp.up_proj.weight"
    compress(base, ft, tmp_path / "b", codec="auto", target_ratio=1.2, candidates=CANDS, calibration={one: acts[one]}, progress=False)
    metrics = {k: e["stats"]["auto_metric"] for k, e in _auto(tmp_path / "b").items()}
    assert metrics.pop("model.embed_tokens.weight") == "rel_l2" and set(metrics.values()) == {"aligned_l2"}
    # deltadq's group_size="auto" gets the layer's activations
    compress(base, ft, tmp_path / "q", codec="deltadq", preset="16x", calibration=acts, progress=False, compute_stats=False)
    name = "model.layers.0.self_attn.o_proj.weight"
    b, f = Checkpoint(base), Checkpoint(ft)
    delta = f.read(name).float() - b.read(name).float()
    assert _tensors(tmp_path / "q")[name]["params"]["group_size"] == choose_group_size(delta, PRESETS["16x"]["p"], acts[name])
    # activations of the wrong width, or for another model, are refused
    with pytest.raises(ShapeMismatchError, match="16 features but the tensor has 32 columns"):
        compress(base, ft, tmp_path / "x", calibration={name: torch.zeros(4, 16)}, progress=False)
    with pytest.raises(ShapeMismatchError, match="none of the fine-tune's tensors"):
        compress(base, ft, tmp_path / "x", calibration={"other.weight": torch.zeros(4, 16)}, progress=False)


def test_calibrate_cli_and_text_calibration(pair: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    base0, ft = pair
    base = tmp_path / "base"
    shutil.copytree(base0, base)
    _tiny_tokenizer(base)
    text = tmp_path / "calib.txt"
    text.write_text("def the return import a of to and in is for on with that by this class if else\n" * 20)
    out = tmp_path / "calib.safetensors"
    r = runner.invoke(app, ["calibrate", str(base), "--text", str(text), "-o", str(out), "--max-tokens", "200", "--max-rows", "64"])
    assert r.exit_code == 0, r.output
    acts = load_calibration(out)
    assert acts["model.layers.0.mlp.down_proj.weight"].shape == (64, 64)
    r = runner.invoke(app, ["calibrate", str(base), "--text", str(text), "-o", str(out)])
    assert _one_error_line(r) and "already exists" in r.output
    r = runner.invoke(app, ["calibrate", str(base), "--text", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "c2.safetensors")])
    assert _one_error_line(r) and "not found" in r.output
    for calib, d in ((out, "d1"), (text, "d2")):  # the .safetensors, or the text run through the base on the fly
        r = runner.invoke(app, ["compress", str(base), str(ft), "-o", str(tmp_path / d), "--codec", "auto", "--max-bytes", "200kB",
                                "--candidate", "bitdelta:granularity=row", "--candidate", "topk-ternary:density=0.1",
                                "--calibration", str(calib), "-q"])
        assert r.exit_code == 0, r.output
        metrics = {k: e["stats"]["auto_metric"] for k, e in _auto(tmp_path / d).items()}
        assert metrics.pop("model.embed_tokens.weight") == "rel_l2" and set(metrics.values()) == {"aligned_l2"}


@pytest.mark.parametrize("cols", [8, 16, 64])
def test_default_policy_compresses_a_tiny_model_whose_manifest_takes_the_default_budget(tmp_path: Path, cols: int) -> None:
    """A model so small that its manifest alone is larger than 1/20 of its fp16 bytes: the default policy (no
    budget asked for) codes its matrices at the default ratio instead of failing, and the rebuild is close."""
    from deltahub.format.io import save_tensors

    g = torch.Generator().manual_seed(cols)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(cols, cols, generator=g), "model.norm.weight": torch.ones(cols)}
    ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    for d, t in (("b", base), ("f", ft)):
        (tmp_path / d).mkdir()
        save_tensors(tmp_path / d / "model.safetensors", t)
    compress(tmp_path / "b", tmp_path / "f", tmp_path / "d", progress=False)
    out = apply_delta(tmp_path / "d", tmp_path / "b", tmp_path / "r", progress=False)
    rebuilt = Checkpoint(tmp_path / "r").read("model.layers.0.mlp.up_proj.weight")
    w = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(Checkpoint(tmp_path / "r").read("model.norm.weight"), ft["model.norm.weight"])
    d, dhat = (ft[w] - base[w]).reshape(-1), (rebuilt - base[w]).reshape(-1)
    assert float(d @ dhat) > 0.2 * float(d.norm() * dhat.norm())  # the coded delta points along the fine-tune's
    assert out is not None
