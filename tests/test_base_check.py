"""One base-verification rule for apply and resident (issue 14, finding 4)."""

from pathlib import Path

import pytest
import torch

from deltahub.compression import compress
from deltahub.delta import Delta, check_base_digest, check_base_shape
from deltahub.errors import BaseMismatchError, ShapeMismatchError
from deltahub.resident import attach_delta

from conftest import make_tiny_pair


def _message(exc: BaseException) -> str:
    text = str(exc)
    path = getattr(exc, "path", None)
    return text.removeprefix(f"{path}: ") if path else text


def test_resident_refuses_a_wrong_base_like_apply(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base, ft = make_tiny_pair(tmp_path / "a")
    other, _ = make_tiny_pair(tmp_path / "b", seed=5)
    compress(base, ft, tmp_path / "d", codec="bitdelta", progress=False)
    d = Delta(tmp_path / "d")
    with pytest.raises(BaseMismatchError) as applied:
        d.apply(other, tmp_path / "out", progress=False)
    model = AutoModelForCausalLM.from_pretrained(other, dtype="auto").eval()
    with pytest.raises(BaseMismatchError) as attached:
        attach_delta(model, d, "A")
    d.close()
    assert "sha256" in _message(applied.value)
    assert _message(applied.value) == _message(attached.value)
    assert not (tmp_path / "out").exists()


def test_shared_rules_directly(tmp_path: Path) -> None:
    base, ft = make_tiny_pair(tmp_path)
    m = compress(base, ft, tmp_path / "d", codec="bitdelta", progress=False)
    name, entry = next((n, e) for n, e in m.tensors.items() if e.base_sha256 is not None)
    check_base_digest(m, name, entry.base_sha256, path=None)
    check_base_shape(m, name, torch.Size(entry.shape), path=None)
    with pytest.raises(BaseMismatchError, match=name):
        check_base_digest(m, name, "0" * 64, path=None)
    with pytest.raises(ShapeMismatchError, match="shape"):
        check_base_shape(m, name, [s + 1 for s in entry.shape], path=None)
