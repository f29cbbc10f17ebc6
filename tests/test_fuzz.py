"""Untrusted deltas: seeded structured + byte mutations of a tiny real delta through the public API.

Every outcome must be a typed one-line ``DeltaHubError`` or a bit-identical rebuild (see
:mod:`deltahub.testing.fuzz`). The harness's own judgement (hang, memory, untyped, identical) is
checked first on synthetic cases, so a green fuzz run means something.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from deltahub.errors import CorruptFileError
from deltahub.testing import fuzz as fz

@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[fz.Target]:
    return fz.build_corpus(tmp_path_factory.mktemp("fuzz-corpus"))


def _noop(t: fz.Target) -> fz.Mutation:
    return fz.Mutation("noop", t.name, "no change", {})


def test_corpus_covers_every_codec_and_file_kind(corpus: list[fz.Target]) -> None:
    import json

    codecs = set()
    for t in corpus:
        codecs |= {e["codec"] for e in json.loads(t.files[fz.MANIFEST_NAME])["tensors"].values()}
    assert codecs >= {"bitdelta", "deltadq", "dare", "topk-ternary", "rowsparse", "raw", "unchanged", "alias"}
    assert any(fz.INDEX_NAME in t.files for t in corpus)
    assert all(t.aux_files for t in corpus)
    assert all(t.largest_tensor_bytes > 0 for t in corpus)


def test_unmutated_is_identical_in_process_and_through_cli(corpus: list[fz.Target], tmp_path: Path) -> None:
    f = fz.Fuzzer(corpus, tmp_path, cli_fraction=1.0)
    for t in corpus:
        r = f.run(0, _noop(t), random.Random(0))
        assert (r.api, r.cli) == ("ok-identical", "ok-identical"), r


def test_harness_flags_hang_memory_untyped_and_bad_message(corpus: list[fz.Target], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    t = corpus[0]
    f = fz.Fuzzer(corpus, tmp_path, timeout=0.5, slack_bytes=32 * 1024**2)

    # the other checks must not hit the short hang timeout on a loaded machine (touching 96 MB can take > 0.5 s)
    patient = fz.Fuzzer(corpus, tmp_path, timeout=20, slack_bytes=32 * 1024**2)

    def run_with(fake, fuzzer=patient):  # type: ignore[no-untyped-def]
        monkeypatch.setattr(fz, "rebuild", fake)
        return fuzzer.run(0, _noop(t), random.Random(1))  # rng 1: no CLI sample

    start = time.perf_counter()
    assert run_with(lambda d, b: time.sleep(5), f).api == "hang"
    assert time.perf_counter() - start < 3

    kept: list = []

    def hog(d, b):  # type: ignore[no-untyped-def]
        import mmap

        # Fresh pages from the kernel, all touched and kept until the harness has measured: in a long
        # test session a heap allocation may reuse memory that is already resident (no RSS growth).
        x = mmap.mmap(-1, 96 * 1024**2)
        x.write(b"\x01" * len(x))
        kept.append(x)
        raise CorruptFileError(f"fake, after {len(x)} bytes")

    r = run_with(hog)
    for x in kept:
        x.close()
    assert r.api == "memory" and r.peak_growth >= 90 * 1024**2, r

    def untyped(d, b):  # type: ignore[no-untyped-def]
        raise ValueError("boom")

    r = run_with(untyped)
    assert (r.api, r.error_type) == ("untyped-error", "ValueError") and r.failed

    def two_lines(d, b):  # type: ignore[no-untyped-def]
        raise CorruptFileError("line one\nline two")

    assert run_with(two_lines).api == "bad-message"
    assert run_with(lambda d, b: {"x": __import__("torch").zeros(1)}).api == "different-output"

    def huge(d, b):  # type: ignore[no-untyped-def]
        import torch

        return torch.empty(64 * 1024**3, dtype=torch.uint8)  # refused by the RLIMIT_AS safety net

    assert run_with(huge).api == "memory"


def test_grouping_names_deepest_deltahub_frame(corpus: list[fz.Target], tmp_path: Path) -> None:
    import json

    t = next(t for t in corpus if t.name == "mixed")
    m = json.loads(t.files[fz.MANIFEST_NAME])
    m["files"] = 0.5  # today: TypeError inside Manifest.from_dict
    mut = fz.Mutation("manifest-struct", t.name, "files = 0.5", {fz.MANIFEST_NAME: fz._dumps(m)})
    r = fz.Fuzzer(corpus, tmp_path).run(0, mut, random.Random(1))
    if r.api == "untyped-error":
        assert r.where and r.where.startswith("deltahub/") and "testing" not in r.where
    else:
        assert r.api == "typed-error"


def test_mutations_are_seeded(corpus: list[fz.Target]) -> None:
    def descs(seed: int) -> list[str]:
        rng = random.Random(seed)
        return [m.desc for _ in range(200) for m in fz.generate(rng, corpus)]

    assert descs(5) == descs(5)
    assert descs(5) != descs(6)
    rng = random.Random(0)
    families = {m.family for _ in range(600) for m in fz.generate(rng, corpus)}
    assert families == set(fz.FAMILIES)


def _run_fuzz(corpus: list[fz.Target], tmp_path: Path, cases: int, seed: int) -> fz.Report:
    rep = fz.fuzz(corpus, cases, seed, tmp_path)
    print("\n" + rep.table())
    return rep


def test_fuzz_every_corruption_is_typed_or_identical(corpus: list[fz.Target], tmp_path: Path) -> None:
    rep = _run_fuzz(corpus, tmp_path, cases=3000, seed=20240601)
    assert rep.cases >= 3000
    assert rep.n_failures == 0, rep.table()


@pytest.mark.slow
def test_fuzz_every_corruption_is_typed_or_identical_long(corpus: list[fz.Target], tmp_path: Path,
                                                          request: pytest.FixtureRequest) -> None:
    """10x the CI cases (~5 min on 2 cores). Opt-in: ``-m slow`` or DELTAHUB_FUZZ_CASES=N."""
    expr = request.config.getoption("-m") or ""
    if "slow" not in expr.replace("not slow", "") and not os.environ.get("DELTAHUB_FUZZ_CASES"):
        pytest.skip("long fuzz: select with -m slow or set DELTAHUB_FUZZ_CASES")
    rep = _run_fuzz(corpus, tmp_path, cases=int(os.environ.get("DELTAHUB_FUZZ_CASES") or 30000), seed=7)
    assert rep.n_failures == 0, rep.table()


def test_protected_manifest_gets_as_is_and_restamped_variants(corpus: list[fz.Target], monkeypatch: pytest.MonkeyPatch) -> None:
    """With a v1.1 manifest (``manifest_digest``) and a library digest function, each structured edit
    runs as-is (must be refused) and re-stamped (judged on its meaning)."""
    import dataclasses
    import hashlib
    import json
    import sys
    import types

    def manifest_digest(d: dict) -> str:
        body = {k: v for k, v in d.items() if k != fz.DIGEST_KEY}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    monkeypatch.setitem(sys.modules, "deltahub.format.integrity", types.SimpleNamespace(manifest_digest=manifest_digest))
    t = corpus[0]
    m = dict(t.manifest)
    m[fz.DIGEST_KEY] = manifest_digest(m)
    pt = dataclasses.replace(t, manifest=m)
    assert pt.protected
    rng = random.Random(3)
    muts = [mut for _ in range(300) for mut in fz._manifest_struct(rng, pt)]
    as_is = [x for x in muts if not x.desc.endswith("[restamped]")]
    stamped = [x for x in muts if x.desc.endswith("[restamped]")]
    assert stamped and all(x.must_fail for x in as_is)
    assert not any(x.must_fail for x in stamped)
    for x in stamped:
        d = json.loads(x.files[fz.MANIFEST_NAME])
        assert d[fz.DIGEST_KEY] == manifest_digest(d)
    assert any(x.desc.startswith("manifest_digest") for x in as_is)
