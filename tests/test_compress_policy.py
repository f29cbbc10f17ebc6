"""compress(): how ``params`` combines with an explicit ``policy`` (issue 14, finding 2)."""

from pathlib import Path

import pytest

from deltahub.compression import _validated_policy, compress
from deltahub.errors import InvalidCodecParamsError
from deltahub.policy import Policy


def test_params_merge_into_policy_main_params() -> None:
    p = _validated_policy("bitdelta", {"granularity": "row"}, Policy(codec="bitdelta"), None)
    assert p.codec == "bitdelta" and p.params == {"granularity": "row"}
    # Keys given once in each place are merged; the same value twice is fine.
    p = _validated_policy("bitdelta", {"granularity": "row"}, Policy(codec="bitdelta", params={"granularity": "row"}), None)
    assert p.params == {"granularity": "row"}


def test_params_clashing_with_policy_raise() -> None:
    with pytest.raises(InvalidCodecParamsError, match="granularity"):
        _validated_policy("bitdelta", {"granularity": "row"}, Policy(codec="bitdelta", params={"granularity": "tensor"}), None)


def test_compress_applies_params_given_with_policy(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = tiny_pair
    m = compress(base, ft, tmp_path / "d", policy=Policy(codec="bitdelta"), params={"granularity": "row"}, progress=False)
    coded = [e for e in m.tensors.values() if e.codec == "bitdelta"]
    assert coded and all(e.params["granularity"] == "row" for e in coded)
    with pytest.raises(InvalidCodecParamsError):
        compress(base, ft, tmp_path / "e", policy=Policy(codec="bitdelta", params={"granularity": "tensor"}),
                 params={"granularity": "row"}, progress=False)
    assert not (tmp_path / "e").exists()


def test_parallel_encoding_writes_the_bytes_of_a_serial_run(tiny_pair: tuple[Path, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The default policy encodes tensors on several workers once the allocation has decided everything;
    what it writes (stored tensors, manifest) is byte-identical to a one-worker run."""
    base, ft = tiny_pair
    outs = []
    for workers in ("1", "3"):
        monkeypatch.setenv("DELTAHUB_NUM_WORKERS", workers)
        out = tmp_path / f"d{workers}"
        compress(base, ft, out, progress=False)
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()})
    assert outs[0] == outs[1] and any(n.endswith(".safetensors") for n in outs[0])
