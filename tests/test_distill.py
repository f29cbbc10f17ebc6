"""Distillation of a delta's continuous parameters (deltahub.distill)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_pair
from safetensors.torch import load_file, save_file

from deltahub import Delta, compress
from deltahub.distill import CalibrationTextError, Student, calibration_texts, distill
from deltahub.errors import DeltaHubError
from deltahub.evaluation import mean_token_kl
from deltahub.policy import Policy, Rule

torch.set_num_threads(2)


def _structured_pair(root: Path) -> tuple[Path, Path]:
    """Tiny pair whose deltas are low-rank with row-scaled magnitudes: 1-bit codes leave something to fix."""
    base, ft = make_tiny_pair(root, delta_std=0.0)
    sd = load_file(str(ft / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    for name, t in sd.items():
        if t.dim() == 2:
            r, c = t.shape
            low = torch.randn(r, 2, generator=g) @ torch.randn(2, c, generator=g)
            rowscale = torch.rand(r, 1, generator=g) * 3
            sd[name] = t + 0.03 * low * rowscale / 1.4
    save_file(sd, str(ft / "model.safetensors"), metadata={"format": "pt"})
    return base, ft


def _blocks(n: int, seq: int = 16, seed: int = 0, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _ft_model(ft: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(ft), dtype=torch.float32).eval()


POLICIES = {
    "bitdelta": dict(codec="bitdelta"),
    "default (whole-model auto)": dict(),
    "bitdelta-row": dict(codec="bitdelta", params={"granularity": "row"}),
    "deltadq-kmeans": dict(codec="deltadq", preset="16x"),
    "deltadq-uniform": dict(codec="deltadq", params={"p": 0.5, "bits": 2, "quantizer": "uniform", "qgroup": 16}),
    "whole": dict(policy=Policy(codec="bitdelta", rules=[
        Rule.parse("*embed_tokens*=topk-ternary:density=0.25"),
        Rule.parse("*self_attn.o_proj*=dare:p=0.5")])),
}


@pytest.mark.parametrize("kind", list(POLICIES))
def test_step0_student_equals_rebuild(tmp_path: Path, kind: str) -> None:
    base, ft = _structured_pair(tmp_path)
    out = tmp_path / "d"
    compress(base, ft, out, progress=False, **POLICIES[kind])
    student = Student(out, base, torch.device("cpu"))
    assert student.coded, "no trainable tensor found"
    rebuilt = Delta(out).to_model(base, progress=False)
    x = _blocks(2)
    with torch.no_grad():
        a = student.logits(x)
        b = rebuilt(input_ids=x, use_cache=False).logits
        for name, c in student.coded.items():
            assert torch.equal(c.weight(), Delta(out).reconstruct(name, load_file(str(base / "model.safetensors"))[name]))
    assert torch.equal(a, b)


def _distill_and_check(tmp_path: Path, kind: str, loss: str = "mse") -> None:
    base, ft = _structured_pair(tmp_path)
    out = tmp_path / "d"
    compress(base, ft, out, progress=False, **POLICIES[kind])
    before_files = load_file(str(out / "delta.safetensors"))
    teacher = _ft_model(ft)
    held = _blocks(8, seed=7)
    kl0 = mean_token_kl(teacher, Delta(out).to_model(base, progress=False), held)
    losses: list[float] = []
    m = distill(out, base, ft, _blocks(32), steps=60, lr=3e-2, batch_size=4, loss=loss,
                log=lambda s, v: losses.append(v), progress=False)
    kl1 = mean_token_kl(teacher, Delta(out).to_model(base, progress=False), held)
    assert sum(losses[-5:]) < sum(losses[:5])
    assert kl1 < 0.9 * kl0, (kl0, kl1)
    # codes unchanged bit for bit, continuous tensors changed
    after_files = load_file(str(out / "delta.safetensors"))
    assert set(after_files) == set(before_files)
    trained = {"scale", "codebook", "norm", "qmin", "qstep"}
    changed = {k for k in after_files if not torch.equal(after_files[k], before_files[k])}
    assert changed and all(k.rsplit(".", 1)[1] in trained for k in changed)
    # verifies, records the run
    Delta(out).state_dict(base)
    d = json.loads((out / "delta_config.json").read_text())
    assert d["distillation"]["loss"] == loss and d["distillation"]["steps"] == 60
    assert d["distillation"]["trained"]
    assert m.distillation is not None and Delta(out).manifest.distillation["steps"] == 60


def test_distill_bitdelta(tmp_path: Path) -> None:
    _distill_and_check(tmp_path, "bitdelta")


def test_distill_whole_model_kl_loss(tmp_path: Path) -> None:
    _distill_and_check(tmp_path, "whole", loss="kl")


def test_distill_deltadq_uniform(tmp_path: Path) -> None:
    _distill_and_check(tmp_path, "deltadq-uniform")


def test_distill_text_and_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from deltahub.cli import app

    base, ft = _structured_pair(tmp_path)
    tok = _tiny_tokenizer(ft)
    assert tok is not None
    (tmp_path / "c1.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    (tmp_path / "c2.txt").write_text("class A:\n    pass\n" * 40)
    out = tmp_path / "d"
    r = CliRunner().invoke(app, ["compress", str(base), str(ft), "-o", str(out), "--distill", "--calibration",
                                 str(tmp_path / "c*.txt"), "--steps", "3", "--distill-tokens", "256",
                                 "--distill-loss", "kl"])
    assert r.exit_code == 0, r.output
    d = json.loads((out / "delta_config.json").read_text())
    assert d["distillation"]["steps"] == 3 and "c1.txt" in d["distillation"]["calibration"]
    Delta(out).state_dict(base)
    r = CliRunner().invoke(app, ["compress", str(base), str(ft), "-o", str(tmp_path / "e"), "--distill", "--calibration",
                                 str(tmp_path / "nothing*.txt")])
    assert r.exit_code != 0 and "matches no file" in r.output
    assert not (tmp_path / "e").exists()


def _tiny_tokenizer(ft: Path):
    """A word-level tokenizer over the tiny vocabulary, saved into the fine-tune directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(127)} | {"[UNK]": 127}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="t2")
    fast.save_pretrained(str(ft))
    return fast


def test_bad_calibration_is_typed(tmp_path: Path) -> None:
    with pytest.raises(CalibrationTextError, match="not found"):
        calibration_texts(tmp_path / "missing.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(CalibrationTextError, match="not UTF-8"):
        calibration_texts(tmp_path / "bin.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(CalibrationTextError, match="holds no text"):
        calibration_texts([tmp_path / "empty.txt"])
    assert issubclass(CalibrationTextError, DeltaHubError)
    with pytest.raises(CalibrationTextError, match="holds no text"):  # a glob skips the binary file
        calibration_texts([str(tmp_path / "*.txt")])
    with pytest.raises(CalibrationTextError, match="matches no file"):
        calibration_texts([str(tmp_path / "*.md")])


def test_distill_sharded_into_output_dir(tmp_path: Path) -> None:
    base, ft = _structured_pair(tmp_path)
    src = tmp_path / "d"
    compress(base, ft, src, codec="bitdelta", progress=False, max_shard_size=4_000)
    files_before = json.loads((src / "delta_config.json").read_text())["files"]
    assert "delta.safetensors.index.json" in files_before
    dst = tmp_path / "out"
    distill(src, base, ft, _blocks(8), steps=2, lr=1e-2, output_dir=dst, progress=False)
    d = json.loads((dst / "delta_config.json").read_text())
    assert "delta.safetensors.index.json" in d["files"] and len(d["files"]) == len(set(d["files"]))
    assert any(f.startswith("delta-0") for f in d["files"])
    Delta(dst).state_dict(base)
    assert "distillation" not in json.loads((src / "delta_config.json").read_text())  # the source is untouched
    with pytest.raises(DeltaHubError):  # an existing, different output is not replaced silently
        distill(src, base, ft, _blocks(8), steps=1, output_dir=dst, progress=False)


def test_calibration_from_a_saved_datasets_dataset(tmp_path: Path) -> None:
    """A local `datasets.save_to_disk` directory is calibration text too (its text column; nothing downloaded)."""
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"id": [1, 2, 3], "text": ["alpha beta", "", "gamma delta"]})})
    dd.save_to_disk(str(tmp_path / "ds"))
    texts, desc = calibration_texts(tmp_path / "ds")
    assert texts == ["alpha beta", "gamma delta"] and "sha256:" in desc
    datasets.Dataset.from_dict({"n": [1, 2]}).save_to_disk(str(tmp_path / "numbers"))
    with pytest.raises(CalibrationTextError, match="no text column"):
        calibration_texts(tmp_path / "numbers")
