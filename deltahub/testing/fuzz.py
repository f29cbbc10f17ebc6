"""Fuzz harness for untrusted deltas: seeded mutations of a small real delta, run through the public API.

Every mutated delta must end in one of the *allowed* outcomes:

``ok-identical``
    the rebuild succeeded and every tensor (name, dtype, shape, raw bytes) equals the rebuild of
    the unmutated delta (the mutation touched nothing that matters, e.g. a ``stats`` value);
``typed-error``
    a :class:`deltahub.errors.DeltaHubError` subclass whose message is one non-empty line;
``semantic-change``
    the rebuild differs, but the manifest was re-sealed after the edit (``[restamped]``: its
    digest is valid, so it is what its author wrote, and a reader can only check that it is
    well-formed: such cases must end typed or rebuilt, never untyped, hung or out of memory), or
    the mutation is a *valid* change of meaning on the explicit
    allowlist (:data:`SEMANTIC_ALLOWLIST`: another valid ``seed``/``stream`` of a random-mask
    codec), made to an unprotected (v1.0) manifest or re-stamped after the change; or (apply
    only) an edit of ``config`` other than ``architectures`` that changes nothing but the written
    ``config.json`` (:data:`CONFIG_ALLOWANCE`).

and every other outcome is a FAILURE:

``different-output``
    success, different bytes (a corruption went unnoticed);
``undetected``
    success after a change that must be refused whatever its content: a manifest with
    duplicate JSON keys, or a structured change to a manifest carrying ``manifest_digest``
    without re-stamping it;
``untyped-error``
    any other exception (recorded with its type and the deepest ``deltahub/...:line`` frame);
``bad-message``
    a typed error whose message is empty or spans several lines (the CLI prints it as-is);
``hang``
    the case ran past ``timeout`` seconds (SIGALRM raises a private ``BaseException``);
``memory``
    peak RSS grew above the bound, or the address-space safety net refused an allocation.

Memory: on Linux, before each case the peak-RSS counter is reset (``/proc/self/clear_refs`` ``5``)
and ``VmRSS`` is read as the baseline; after the case ``VmHWM`` must be at most
``baseline + 2 * largest rebuilt tensor + slack``. The slack (default
:data:`DEFAULT_SLACK_BYTES`, 16 MiB) covers allocator/thread noise. Measured on the tiny corpus
(largest rebuilt tensor 16 KiB): unmutated rebuilds and CLI applies grow the peak by at most
~80 KiB after warm-up (``python -m deltahub.testing.fuzz --measure``, :func:`measure_slack`); over
3,000 mutated cases the largest growth of any allowed outcome was ~4 MiB (parsing a manifest with a
100,000-element list or a 100,000-character string). 16 MiB is 4x that worst legitimate case, and
still 1,000x the largest tensor, so any allocation sized by a hostile header stands out. As a *safety net only*, so a hostile shape cannot make this process
touch tens of GiB on a shared machine, each case runs under a soft ``RLIMIT_AS`` of the current
address space + ``as_headroom`` (2 GiB): far above anything the tiny corpus legitimately needs,
far below what would hurt the host. An allocation refused by it is reported as ``memory``.

Each case is a fresh copy of the delta directory (a few tens of KiB) with only the mutated files
rewritten. The main check is in-process ``Delta(dir).state_dict(base)``; a sample
(``cli_fraction``, and every aux-file mutation, since only ``apply`` reads aux files) also runs
``deltahub apply`` through :class:`typer.testing.CliRunner`: exit 0 with an output directory
byte-identical to the unmutated one, or exit 1 with one line of error and no traceback, and
nothing written outside the output directory.

Mutation families (:data:`FAMILIES`): raw byte flips/sets/inserts/deletes/truncations in the
safetensors data sections, header JSON and 8-byte length prefix, the shard index, aux files and
``delta_config.json``; structured edits of safetensors headers (dtype, shape, offsets, overlaps),
of the index (``weight_map`` file names) and of the manifest (hostile values at a random JSON
path, deleted keys, duplicated keys written as raw JSON text, two tensors' entries swapped). A
structured manifest edit of a manifest that carries ``manifest_digest`` runs twice: as-is (must be
refused) and re-stamped with the library's own digest function (:func:`restamp`).

Standalone::

    python -m deltahub.testing.fuzz --cases 3000 --seed 0 --json fuzz.json

prints outcome counts by family and the failures grouped by (exception type, deltahub file:line)
with one example each.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import math
import os
import random
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Outcomes that are not failures.
ALLOWED = frozenset({"ok-identical", "typed-error", "semantic-change"})
#: Default per-case timeout (seconds).
DEFAULT_TIMEOUT = 10.0
#: Allocator / thread-stack noise allowed on top of 2x the largest rebuilt tensor (see module doc).
DEFAULT_SLACK_BYTES = 16 * 1024**2
#: Address-space headroom of the RLIMIT_AS safety net (not the memory check itself).
DEFAULT_AS_HEADROOM = 2 * 1024**3

MANIFEST_NAME = "delta_config.json"
INDEX_NAME = "delta.safetensors.index.json"
DIGEST_KEY = "manifest_digest"

FAMILIES = (
    "st-data-bytes",       # bytes of a safetensors data section
    "st-header-bytes",     # bytes of a safetensors header's JSON text
    "st-prefix-bytes",     # the 8-byte little-endian header length
    "st-header-struct",    # structured edits of a safetensors header (dtype, shape, offsets, overlap)
    "index-bytes",         # bytes of delta.safetensors.index.json (sharded deltas)
    "index-struct",        # structured edits of the index's weight_map
    "aux-bytes",           # bytes of tokenizer.json & co (checked through apply)
    "manifest-bytes",      # raw bytes of delta_config.json
    "manifest-struct",     # hostile value at a JSON path / deleted key / swapped entries
    "manifest-dupkey",     # a duplicated JSON key (raw text)
)

#: Draw weights (default 1): the manifest has the most distinct fields to get wrong.
FAMILY_WEIGHTS = {"manifest-struct": 3, "manifest-bytes": 1.5}

_HUGE_LIST_LEN = 100_000
_LONG_STRING = "A" * 100_000


def _hostile_values() -> list[Any]:
    return [None, True, False, "", "x", -1, 0, 1, 2, 2**31, 2**63, 1e12, -0.5, 0.5, math.nan, math.inf, -math.inf,
            [], {}, [0] * _HUGE_LIST_LEN, "../x", "/etc/passwd", _LONG_STRING, [1, 2, 3], {"a": 1}]


#: Valid-looking alternatives for keys whose hostile values alone would rarely reach decode.
_ALTERNATIVES: dict[str, list[Any]] = {
    "dtype": ["float16", "bfloat16", "float32", "float64", "int8", "uint8", "bool", "int64", "float8_e4m3fn", "complex64", "Tensor", "__class__"],
    "codec": ["raw", "bitdelta", "deltadq", "dare", "topk-ternary", "rowsparse", "unchanged", "auto", "BitDelta"],
    "granularity": ["tensor", "row", "group"],
    "mask_encoding": ["bitmap", "indices", "auto"],
    "quantizer": ["kmeans", "uniform"],
    "mode": ["full", "xor", "auto"],
    "entropy": ["zstd", "none"],
    "preset": ["16x", "32x", "512x", None],
    "format_version": ["1.0", "1.1", "1.999", "2.0", "0.9", "1", "1.x", "01.0"],
    "format": ["deltahub", "safetensors"],
    "architectures": [["LlamaForCausalLM"], ["os.system"], ["__import__"], ["AutoModel"], "LlamaForCausalLM", [None]],
    "bits": [1, 2, 3, 4, 8, 9], "parts": [1, 2, 4, 3], "group_size": [1, 2, 7, 8, 64, "auto"], "qgroup": [1, 7, 24],
    "p": [0.0, 0.25, 0.5, 0.75, 0.9375, 0.999], "density": [0.001, 0.1, 0.5, 1.0],
    "seed": [0, 1, 7, 2**31 - 1, 2**32 - 1, 2**64 - 1], "stream": [0, 1, 7, 0xFFFFFFFF],
    "base_rows": [0, 1, 31, 32, 33, 127, 128, 129, 2**40],
    "zstd_level": [0, 3, 22], "shuffle": [False, True],
}


@dataclass(frozen=True)
class SemanticRule:
    """A (params key, valid value) kind whose change legitimately changes the rebuild."""

    key: str
    accepts: Callable[[Any], bool]
    why: str


def _uint(hi: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= hi


#: A different-output success of a (re-stamped or unprotected) structured edit is allowed only here.
SEMANTIC_ALLOWLIST: tuple[SemanticRule, ...] = (
    SemanticRule("seed", _uint(2**64 - 1),
                 "dare/deltadq: the seed only picks which positions the stored values land on; any valid seed "
                 "is a different but well-formed delta, and nothing stored can tell which seed was used"),
    SemanticRule("stream", _uint(0xFFFFFFFF),
                 "dare/deltadq: like seed (the per-tensor stream id of the same counter-based RNG)"),
)


#: Justification of the one path-scoped allowance: edits of ``config`` (other than ``architectures``).
CONFIG_ALLOWANCE = ("the model config is the fine-tune's config.json carried verbatim; deltahub interprets only "
                    "`architectures` (validated), so any other edit is a legitimately different config.json. It must "
                    "leave every rebuilt tensor identical: only apply's config.json may differ")


def semantic_rule(path: tuple[Any, ...], value: Any) -> SemanticRule | None:
    """The allowlist rule covering a replacement of ``path`` (in the manifest) by ``value``, if any."""
    if len(path) == 4 and path[0] == "tensors" and path[2] == "params":
        for rule in SEMANTIC_ALLOWLIST:
            if path[3] == rule.key and rule.accepts(value):
                return rule
    return None


# --------------------------------------------------------------------------------------------- targets


@dataclass
class Target:
    """A pristine delta to mutate, with its base and the reference outputs of the unmutated delta."""

    name: str
    delta_dir: Path
    base_dir: Path
    files: dict[str, bytes]
    reference: dict[str, tuple[str, tuple[int, ...], bytes]]
    applied: dict[str, bytes]
    largest_tensor_bytes: int
    manifest: dict[str, Any]

    @property
    def protected(self) -> bool:
        """True when the manifest carries its own digest (format v1.1)."""
        return DIGEST_KEY in self.manifest

    @property
    def safetensors_files(self) -> list[str]:
        return sorted(n for n in self.files if n.endswith(".safetensors"))

    @property
    def aux_files(self) -> list[str]:
        return sorted(n for n in self.files if n not in (MANIFEST_NAME, INDEX_NAME) and not n.endswith(".safetensors"))


def _tensor_key(t: Any) -> tuple[str, tuple[int, ...], bytes]:
    import torch

    flat = t.detach().cpu().contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return str(t.dtype), tuple(t.shape), raw


def snapshot_state_dict(sd: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (dtype, shape, raw bytes): the comparison key of a rebuild."""
    return {k: _tensor_key(v) for k, v in sd.items()}


def _read_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def rebuild(delta_dir: Path, base_dir: Path) -> dict[str, Any]:
    """The public-API rebuild every case runs: ``Delta(dir).state_dict(base)``."""
    from deltahub.delta import Delta

    d = Delta(delta_dir)
    try:
        return d.state_dict(base_dir, progress=False)
    finally:
        d.close()


def cli_apply(delta_dir: Path, base_dir: Path, out: Path) -> Any:
    """``deltahub apply`` through typer's CliRunner (stderr kept apart where click allows)."""
    from typer.testing import CliRunner

    from deltahub.cli import app

    try:
        runner = CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        runner = CliRunner()
    return runner.invoke(app, ["apply", str(delta_dir), "--base", str(base_dir), "-o", str(out), "-q"])


def load_target(name: str, delta_dir: str | Path, base_dir: str | Path, scratch: str | Path) -> Target:
    """Read a pristine delta and compute its reference rebuild and reference ``apply`` output."""
    delta_dir, base_dir = Path(delta_dir), Path(base_dir)
    files = {p.name: p.read_bytes() for p in sorted(delta_dir.iterdir()) if p.is_file()}
    sd = rebuild(delta_dir, base_dir)
    ref = snapshot_state_dict(sd)
    largest = max((len(v[2]) for v in ref.values()), default=0)
    out = Path(scratch) / f"ref-apply-{name}"
    shutil.rmtree(out, ignore_errors=True)
    r = cli_apply(delta_dir, base_dir, out)
    if r.exit_code != 0:
        raise RuntimeError(f"reference apply of {delta_dir} failed: {r.output} {r.exception!r}")
    applied = _read_tree(out)
    shutil.rmtree(out)
    return Target(name, delta_dir, base_dir, files, ref, applied, largest, json.loads(files[MANIFEST_NAME]))


def build_corpus(root: str | Path) -> list[Target]:
    """Make a tiny Llama base/fine-tune pair and compress it so every codec appears.

    ``mixed``: one delta file, every codec (bitdelta tensor/row/group, deltadq 16x kmeans and
    uniform parts 1/2, dare, topk-ternary and rowsparse with bitmap and index masks, raw+zstd
    embeddings, unchanged norms), plus aux files. ``sharded``: bfloat16, default policy, cut into several delta shards + index,
    with an untied LM head stored with the embedding's bytes (an ``alias`` entry).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    from deltahub.compression import compress
    from deltahub.policy import Policy, Rule

    root = Path(root)
    targets = []
    for name, dtype, shard in (("mixed", torch.float32, None), ("sharded", torch.bfloat16, 3000)):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=name == "mixed")
        base = LlamaForCausalLM(cfg).to(dtype)
        ft = LlamaForCausalLM(cfg).to(dtype)
        ft.load_state_dict(base.state_dict())
        with torch.no_grad():
            for pname, p in ft.named_parameters():
                if "norm" not in pname:  # norms stay identical: the "unchanged" codec
                    p.add_((torch.randn_like(p, dtype=torch.float32) * 1e-2).to(dtype))
            if name == "sharded":  # untied, but stored twice with the same bytes: an "alias" entry (format 1.3)
                for m in (base, ft):
                    m.lm_head.weight.copy_(m.model.embed_tokens.weight)
        pair = root / f"pair-{name}"
        base.save_pretrained(pair / "base")
        ft.save_pretrained(pair / "ft")
        (pair / "ft" / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}}))
        (pair / "ft" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "bos_token": "<s>"}))
        out = root / f"delta-{name}"
        if name == "mixed":
            rules = [
                "*.layers.0.mlp.gate_proj.*=deltadq:preset=16x",
                "*.layers.0.mlp.up_proj.*=deltadq:preset=16x,quantizer=uniform,parts=1",
                "*.layers.0.mlp.down_proj.*=deltadq:preset=32x,quantizer=uniform,parts=2,group_size=8",
                "*.layers.1.mlp.gate_proj.*=dare:p=0.5,seed=3",
                "*.layers.1.mlp.up_proj.*=topk-ternary:density=0.3,mask_encoding=bitmap",
                "*.layers.1.mlp.down_proj.*=topk-ternary:density=0.02,mask_encoding=indices",
                "*.layers.0.self_attn.q_proj.*=bitdelta:granularity=group,group_size=16",
                "*.layers.0.self_attn.k_proj.*=bitdelta:granularity=tensor",
                "*.layers.1.self_attn.o_proj.*=rowsparse:density=0.75,bits=3,group_size=8",
                "*.layers.1.self_attn.q_proj.*=rowsparse:density=0.25,bits=1,mask_encoding=indices,entropy=zstd",
            ]
            policy = Policy(codec="bitdelta", params={"granularity": "row"}, rules=[Rule.parse(r) for r in rules])
            compress(pair / "base", pair / "ft", out, policy=policy, progress=False)
        else:
            compress(pair / "base", pair / "ft", out, codec="bitdelta", max_shard_size=shard, progress=False)
        targets.append(load_target(name, out, pair / "base", root))
    return targets


# --------------------------------------------------------------------------------------------- mutations


@dataclass
class Mutation:
    """One mutated delta: which files change (``None`` deletes) and how the outcome is judged."""

    family: str
    target: str
    desc: str
    files: dict[str, bytes | None]
    must_fail: bool = False
    semantic: str | None = None  # allowlist key when the change may legitimately alter the rebuilt tensors
    config_edit: bool = False  # a config.* edit (not architectures): only apply's config.json may differ
    restamped: bool = False  # manifest re-sealed after the edit: an authentic manifest, so a valid change of meaning is allowed
    check_apply: bool = False  # the outcome only shows through apply (aux files)


def _byte_mutation(rng: random.Random, data: bytes, lo: int, hi: int) -> tuple[bytes, str]:
    """Flip/set/insert/delete/truncate bytes inside ``data[lo:hi]``."""
    hi = max(hi, lo + 1)
    hi = min(hi, len(data))
    lo = min(lo, max(hi - 1, 0))
    pos = rng.randrange(lo, hi) if hi > lo else lo
    op = rng.choice(("flip", "flip", "set", "insert", "delete", "truncate", "multi"))
    b = bytearray(data)
    if op == "flip" and pos < len(b):
        bit = rng.randrange(8)
        b[pos] ^= 1 << bit
        return bytes(b), f"flip bit {bit} at {pos}"
    if op == "set" and pos < len(b):
        v = rng.choice((0, 0xFF, 0x7F, 0x80, ord("{"), ord('"'), ord("9"), rng.randrange(256)))
        if b[pos] == v:
            v ^= 1
        b[pos] = v
        return bytes(b), f"set byte {pos}={v:#04x}"
    if op == "insert":
        n = rng.choice((1, 1, 2, 8, 100))
        ins = bytes(rng.randrange(256) for _ in range(n))
        return bytes(b[:pos] + ins + b[pos:]), f"insert {n} bytes at {pos}"
    if op == "delete":
        n = rng.choice((1, 1, 2, 8, 100))
        return bytes(b[:pos] + b[pos + n:]), f"delete {n} bytes at {pos}"
    if op == "truncate":
        return bytes(b[:pos]), f"truncate at {pos}"
    n = rng.choice((2, 4, 16))
    where = []
    for _ in range(n):
        p = rng.randrange(lo, hi) if hi > lo else lo
        if p < len(b):
            b[p] = rng.randrange(256)
            where.append(p)
    return bytes(b), f"randomize {len(where)} bytes in {lo}..{hi}"


def _st_sections(data: bytes) -> tuple[int, int]:
    """(header end, file size) of a well-formed safetensors file."""
    (hlen,) = struct.unpack("<Q", data[:8])
    return 8 + hlen, len(data)


def _walk(obj: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, (*path, i))


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _category(path: tuple[Any, ...]) -> str:
    if not path:
        return "root"
    if path[0] == "tensors":
        if len(path) <= 2:
            return "tensor-entry"
        return {"params": "params", "shape": "shape", "dtype": "dtype", "codec": "codec", "stored": "stored",
                "base_sha256": "base-sha", "stats": "stats", "stored_bytes": "stats"}.get(path[2], "tensor-other")
    if path[0] == "config":
        return "architectures" if len(path) > 1 and path[1] == "architectures" else "config"
    return {"files": "files", "base": "base", "format_version": "version", "format": "version",
            "totals": "stats", "finetuned": "other", "created_with": "other"}.get(path[0], "other")


def _fmt_path(path: tuple[Any, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(path)) or "<root>"


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else f"{r[:30]}...<{len(r)} chars>"


def _dumps(d: Any) -> bytes:
    return (json.dumps(d, indent=2) + "\n").encode()


def restamp(manifest: dict[str, Any]) -> bytes | None:
    """``delta_config.json`` bytes of ``manifest`` re-sealed by the library's own digest function, or ``None``.

    Uses ``deltahub.format.integrity.manifest_bytes(dict) -> bytes`` (format 1.1); also accepts a
    module with ``stamp_manifest(dict) -> dict`` or ``manifest_digest(dict) -> str`` (older
    layouts, and the harness's own tests). Returns ``None`` when none exists (format 1.0 code):
    then no re-stamped variant runs.
    """
    try:
        mod = importlib.import_module("deltahub.format.integrity")
    except ImportError:
        return None
    d = copy.deepcopy(manifest)
    fn = getattr(mod, "manifest_bytes", None)
    if callable(fn):
        return bytes(fn(d))
    fn = getattr(mod, "stamp_manifest", None)
    if callable(fn):
        out = fn(d)
        return _dumps(out if isinstance(out, dict) else d)
    fn = getattr(mod, "manifest_digest", None)
    if callable(fn):
        d.pop(DIGEST_KEY, None)
        d[DIGEST_KEY] = fn(d)
        return _dumps(d)
    return None


def _manifest_struct(rng: random.Random, t: Target) -> list[Mutation]:
    m = t.manifest
    nodes = [(p, v) for p, v in _walk(m) if p and p[-1] != DIGEST_KEY]
    by_cat: dict[str, list[tuple[tuple[Any, ...], Any]]] = defaultdict(list)
    for p, v in nodes:
        by_cat[_category(p)].append((p, v))
    kind = rng.choice(("replace", "replace", "replace", "replace", "delete", "swap", *(("digest",) if t.protected else ())))
    d = copy.deepcopy(m)
    if kind == "digest":
        # a v1.1 manifest without (or with a bogus) digest must be refused, never read as v1.0
        value = rng.choice([None, "", "x", 0, [], {}, m[DIGEST_KEY][:-1] + ("0" if m[DIGEST_KEY][-1:] != "0" else "1"), "<delete>"])
        if value == "<delete>":
            del d[DIGEST_KEY]
        else:
            d[DIGEST_KEY] = value
        return [Mutation("manifest-struct", t.name, f"manifest_digest = {_short(value)}", {MANIFEST_NAME: _dumps(d)}, must_fail=True)]
    if kind == "swap":
        names = list(m["tensors"])
        a, b = rng.sample(names, 2)
        what = rng.choice(("entry", "params", "stored", "shape", "codec"))
        if what == "entry":
            d["tensors"][a], d["tensors"][b] = d["tensors"][b], d["tensors"][a]
        else:
            ea, eb = d["tensors"][a], d["tensors"][b]
            ea[what], eb[what] = eb.get(what), ea.get(what)
        desc, path, value = f"swap {what} of {a} and {b}", ("tensors", a, what), None
    else:
        cat = rng.choice(sorted(by_cat))
        path, old = rng.choice(by_cat[cat])
        parent = _get(d, path[:-1])
        if kind == "delete":
            if isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent.pop(path[-1])
            desc, value = f"delete {_fmt_path(path)}", None
        else:
            pool = _hostile_values()
            key = next((p for p in reversed(path) if isinstance(p, str)), "")
            if key in _ALTERNATIVES and rng.random() < 0.5:
                pool = _ALTERNATIVES[key]
            value = rng.choice(pool)
            if isinstance(value, float) and isinstance(old, float) and value == old or (type(value) is type(old) and value == old):
                value = rng.choice(_hostile_values()[:5])
                if type(value) is type(old) and value == old:
                    return []
            parent[path[-1]] = value
            desc = f"set {_fmt_path(path)} = {_short(value)} (was {_short(old)})"
    if d == m:
        return []  # a no-op (e.g. swapping two equal codec names) is no mutation at all
    sem_rule = semantic_rule(path, value) if kind == "replace" else None
    sem = sem_rule.key if sem_rule else None
    cfg = kind != "swap" and len(path) >= 2 and path[0] == "config" and path[1] != "architectures"
    out = [Mutation("manifest-struct", t.name, desc, {MANIFEST_NAME: _dumps(d)}, must_fail=t.protected,
                    semantic=None if t.protected else sem, config_edit=cfg and not t.protected)]
    if t.protected:
        stamped = restamp(d)
        if stamped is not None:
            out.append(Mutation("manifest-struct", t.name, desc + " [restamped]", {MANIFEST_NAME: stamped},
                                semantic=sem, config_edit=cfg, restamped=True))
    return out


def _dupkey(rng: random.Random, t: Target) -> Mutation:
    """Duplicate a key in the manifest's raw JSON text (first or last copy holds another value)."""
    m = t.manifest
    dict_nodes = [(p, v) for p, v in _walk(m) if isinstance(v, dict) and v]
    path, obj = rng.choice(dict_nodes)
    key = rng.choice(list(obj))
    other = rng.choice([obj[key], *_hostile_values()[:12]])
    if isinstance(other, float) and not math.isfinite(other):
        other = 0
    first = rng.random() < 0.5
    sentinel = "__fuzz_dup_sentinel__"
    d = copy.deepcopy(m)
    holder = _get(d, path)
    items = list(holder.items())
    holder.clear()
    for k, v in items:
        if k == key and first:
            holder[sentinel] = other
        holder[k] = v
        if k == key and not first:
            holder[sentinel] = other
    text = json.dumps(d, indent=2).replace(json.dumps(sentinel), json.dumps(key), 1)
    desc = f"duplicate key {_fmt_path((*path, key))} ({'before' if first else 'after'}, other value {_short(other)})"
    return Mutation("manifest-dupkey", t.name, desc, {MANIFEST_NAME: (text + "\n").encode()}, must_fail=True)


def _st_header_struct(rng: random.Random, t: Target) -> Mutation | None:
    fname = rng.choice(t.safetensors_files)
    data = t.files[fname]
    hend, _ = _st_sections(data)
    header = json.loads(data[8:hend])
    names = [k for k in header if k != "__metadata__"]
    if not names:
        return None
    name = rng.choice(names)
    spec = header[name]
    kind = rng.choice(("dtype", "shape", "offsets", "overlap", "delete", "rename", "metadata", "value"))
    if kind == "dtype":
        spec["dtype"] = rng.choice(["F16", "BF16", "F32", "F64", "I8", "U8", "I64", "BOOL", "F8_E4M3", "U64", "C64", "x", 1, None])
        desc = f"{fname}: {name}.dtype = {spec['dtype']!r}"
    elif kind == "shape":
        spec["shape"] = rng.choice([[], [0], [-1], [2**31, 2**31], [2**63], [1.5], ["1"], None, [spec["shape"][0] if spec["shape"] else 1] * 5,
                                    list(reversed(spec["shape"])), [math.prod(spec["shape"])]])
        desc = f"{fname}: {name}.shape = {_short(spec['shape'])}"
    elif kind == "offsets":
        b, e = spec["data_offsets"]
        spec["data_offsets"] = rng.choice([[e, b], [b, e + 1], [b - 1, e - 1], [b + 1, e + 1], [0, e - b], [-1, e - b - 1], [b, 2**63], [b], None, [str(b), str(e)]])
        desc = f"{fname}: {name}.data_offsets = {spec['data_offsets']!r} (was {[b, e]})"
    elif kind == "overlap":
        other = rng.choice(names)
        spec["data_offsets"] = list(header[other]["data_offsets"])
        spec["dtype"], spec["shape"] = header[other]["dtype"], header[other]["shape"]
        desc = f"{fname}: {name} aliased onto the bytes of {other}"
    elif kind == "delete":
        del header[name]
        desc = f"{fname}: header entry {name} deleted"
    elif kind == "rename":
        header[rng.choice(["../x", "", name + "x", "__metadata__x"])] = header.pop(name)
        desc = f"{fname}: header entry {name} renamed"
    elif kind == "metadata":
        header["__metadata__"] = rng.choice([None, [], "x", {"format": "x"}, {"a": 1}, {"format_version": "9.0"}])
        desc = f"{fname}: __metadata__ = {header['__metadata__']!r}"
    else:
        header[name] = rng.choice(_hostile_values()[:16])
        desc = f"{fname}: header entry {name} = {_short(header[name])}"
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return Mutation("st-header-struct", t.name, desc, {fname: struct.pack("<Q", len(raw)) + raw + data[hend:]})


def _index_struct(rng: random.Random, t: Target) -> Mutation:
    idx = json.loads(t.files[INDEX_NAME])
    wm = idx["weight_map"]
    shards = sorted(set(wm.values()))
    key = rng.choice(list(wm))
    kind = rng.choice(("value", "value", "delete", "add", "root", "dup"))
    if kind == "value":
        wm[key] = rng.choice(["../x", "/etc/passwd", "", ".", "..", "delta_config.json", "missing.safetensors",
                              "x/../" + wm[key], *shards, None, 1, [], {}])
        desc = f"weight_map[{key}] = {wm[key]!r}"
    elif kind == "delete":
        del wm[key]
        desc = f"weight_map[{key}] deleted"
    elif kind == "add":
        wm[rng.choice(["extra", "../x", key + ".x"])] = rng.choice([*shards, "../x", "/etc/passwd"])
        desc = "weight_map entry added"
    elif kind == "root":
        idx = rng.choice([[], None, {"weight_map": None}, {"weight_map": []}, {"metadata": {}}, {"weight_map": {}}])
        desc = f"index = {idx!r}"
    else:
        other = rng.choice(shards)
        text = json.dumps(idx, indent=2)
        text = text.replace(f'"{key}": ', f'"{key}": "{other}",\n    "{key}": ', 1)
        return Mutation("index-struct", t.name, f"duplicate weight_map key {key} (first -> {other})", {INDEX_NAME: text.encode()})
    return Mutation("index-struct", t.name, desc, {INDEX_NAME: json.dumps(idx, indent=2).encode()})


def generate(rng: random.Random, targets: list[Target]) -> list[Mutation]:
    """One draw: a family, a target that has what the family mutates, and its mutation(s)."""
    family = rng.choices(FAMILIES, weights=[FAMILY_WEIGHTS.get(f, 1) for f in FAMILIES])[0]
    ts = [t for t in targets if (INDEX_NAME in t.files or not family.startswith("index")) and (t.aux_files or family != "aux-bytes")]
    if not ts:
        return []
    t = rng.choice(ts)
    if family == "manifest-struct":
        return _manifest_struct(rng, t)
    if family == "manifest-dupkey":
        return [_dupkey(rng, t)]
    if family == "st-header-struct":
        m = _st_header_struct(rng, t)
        return [m] if m else []
    if family == "index-struct":
        return [_index_struct(rng, t)]
    if family.startswith("st-"):
        fname = rng.choice(t.safetensors_files)
        data = t.files[fname]
        hend, size = _st_sections(data)
        lo, hi = {"st-data-bytes": (hend, size), "st-header-bytes": (8, hend), "st-prefix-bytes": (0, 8)}[family]
        new, desc = _byte_mutation(rng, data, lo, hi)
        return [Mutation(family, t.name, f"{fname}: {desc}", {fname: new})]
    fname = {"index-bytes": INDEX_NAME, "manifest-bytes": MANIFEST_NAME}.get(family) or rng.choice(t.aux_files)
    data = t.files[fname]
    new, desc = _byte_mutation(rng, data, 0, len(data))
    return [Mutation(family, t.name, f"{fname}: {desc}", {fname: new}, check_apply=family == "aux-bytes")]


# --------------------------------------------------------------------------------------------- running


class _Timeout(BaseException):
    """Raised by SIGALRM inside a case (a BaseException, so no ``except Exception`` swallows it)."""


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _guard(timeout: float, as_headroom: int | None) -> Iterator[None]:
    """SIGALRM after ``timeout`` s (main thread only) and a soft RLIMIT_AS safety net."""
    import resource

    use_alarm = timeout > 0 and hasattr(signal, "setitimer") and _is_main_thread()
    old_handler = None
    if use_alarm:
        def _raise(signum: int, frame: Any) -> None:
            raise _Timeout()

        old_handler = signal.signal(signal.SIGALRM, _raise)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    old_limit = None
    vmsize = _status_kib("VmSize")
    if as_headroom and vmsize is not None:
        try:
            old_limit = resource.getrlimit(resource.RLIMIT_AS)
            hard = old_limit[1]
            soft = vmsize + as_headroom
            if hard != resource.RLIM_INFINITY:
                soft = min(soft, hard)
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        except (ValueError, OSError):
            old_limit = None
    try:
        yield
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)
        if old_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, old_limit)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def deepest_deltahub_frame(exc: BaseException) -> str:
    """``deltahub/<file>:<line>`` of the innermost traceback frame inside deltahub (not its testing helpers)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = "?"
    for fr in frames:
        fn = fr.filename.replace(os.sep, "/")
        i = fn.rfind("/deltahub/")
        if i >= 0 and "/deltahub/testing/" not in fn:
            where = f"deltahub/{fn[i + len('/deltahub/'):]}:{fr.lineno}"
    if where == "?" and frames:
        fr = frames[-1]
        where = f"{Path(fr.filename).name}:{fr.lineno}"
    return where


def _is_memory_exc(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("DefaultCPUAllocator" in msg or "can't allocate memory" in msg or "not enough memory" in msg)


@dataclass
class CaseResult:
    """The judged outcome of one mutation (``api``: in-process rebuild; ``cli``: apply, when run)."""

    index: int
    family: str
    target: str
    desc: str
    api: str
    cli: str | None = None
    error_type: str | None = None
    where: str | None = None
    message: str | None = None
    cli_detail: str | None = None
    cli_error_type: str | None = None
    cli_where: str | None = None
    seconds: float = 0.0
    peak_growth: int | None = None

    @property
    def failed(self) -> bool:
        return self.api not in ALLOWED or (self.cli is not None and self.cli not in ALLOWED)


def _judge_success(same: bool, mut: Mutation) -> str:
    if same:
        return "undetected" if mut.must_fail else "ok-identical"
    if mut.semantic is not None or mut.restamped:
        return "semantic-change"
    return "different-output"


def _judge_error(exc: BaseException) -> tuple[str, str, str, str]:
    from deltahub.errors import DeltaHubError

    msg = str(exc)
    where = deepest_deltahub_frame(exc)
    if isinstance(exc, _Timeout):
        return "hang", "Timeout", where, ""
    if isinstance(exc, DeltaHubError):
        ok = bool(msg.strip()) and "\n" not in msg.strip() and "\r" not in msg
        return ("typed-error" if ok else "bad-message"), type(exc).__name__, where, msg
    if _is_memory_exc(exc):
        return "memory", type(exc).__name__, where, msg
    return "untyped-error", type(exc).__name__, where, msg


def _tree_listing(root: Path, skip: Path | None = None) -> dict[str, tuple[int, int]]:
    out = {}
    for p in root.rglob("*"):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        try:
            st = p.lstat()
        except OSError:
            continue
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


@dataclass
class Fuzzer:
    """Runs mutations of ``targets`` in ``workdir``; see the module docstring for the judgement."""

    targets: list[Target]
    workdir: Path
    timeout: float = DEFAULT_TIMEOUT
    slack_bytes: int = DEFAULT_SLACK_BYTES
    cli_fraction: float = 0.05
    as_headroom: int | None = DEFAULT_AS_HEADROOM
    memory_check: bool = True

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self._by_name = {t.name: t for t in self.targets}
        self._peak_ok = sys.platform.startswith("linux") and _reset_peak()

    def materialize(self, mut: Mutation) -> tuple[Path, Path]:
        """A fresh case root holding ``delta/`` (pristine files + the mutation) and a decoy file ``x``."""
        t = self._by_name[mut.target]
        case = self.workdir / "case"
        if case.exists():
            shutil.rmtree(case)
        d = case / "delta"
        d.mkdir(parents=True)
        (case / "x").write_bytes(b"decoy: a delta must never read or write this file\n")
        for name, data in t.files.items():
            new = mut.files.get(name, data) if name in mut.files else data
            if new is not None:
                (d / name).write_bytes(new)
        for name, data in mut.files.items():
            if name not in t.files and data is not None:
                (d / name).write_bytes(data)
        return case, d

    def _bound(self, t: Target) -> int:
        return 2 * t.largest_tensor_bytes + self.slack_bytes

    def run_api(self, t: Target, d: Path, mut: Mutation, res: CaseResult) -> None:
        base_rss = _status_kib("VmRSS") if self._peak_ok else None
        if self._peak_ok:
            _reset_peak()
        try:
            with _guard(self.timeout, self.as_headroom):
                sd = rebuild(d, t.base_dir)
                same = snapshot_state_dict(sd) == t.reference
                del sd
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - classifying every outcome is the point
            res.api, res.error_type, res.where, res.message = _judge_error(exc)
        else:
            res.api = _judge_success(same, mut)
        if self._peak_ok and base_rss is not None and self.memory_check:
            hwm = _status_kib("VmHWM")
            if hwm is not None:
                res.peak_growth = hwm - base_rss
                if res.peak_growth > self._bound(t) and res.api in ALLOWED:
                    res.api = "memory"
                    res.message = f"peak RSS grew {res.peak_growth} bytes > bound {self._bound(t)}"

    def run_cli(self, t: Target, case: Path, d: Path, mut: Mutation, res: CaseResult) -> None:
        out = case / "out"
        base_rss = _status_kib("VmRSS") if self._peak_ok else None
        if self._peak_ok:
            _reset_peak()
        self._run_cli(t, case, d, out, mut, res)
        if self._peak_ok and base_rss is not None and self.memory_check:
            hwm = _status_kib("VmHWM")
            if hwm is not None and hwm - base_rss > self._bound(t) and res.cli in ALLOWED:
                res.cli, res.cli_detail = "memory", f"peak RSS grew {hwm - base_rss} bytes > bound {self._bound(t)}"

    def _run_cli(self, t: Target, case: Path, d: Path, out: Path, mut: Mutation, res: CaseResult) -> None:
        before = _tree_listing(case, skip=out)
        before_parent = sorted(os.listdir(self.workdir))
        try:
            with _guard(self.timeout, self.as_headroom):
                r = cli_apply(d, t.base_dir, out)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001
            res.cli, res.cli_error_type, res.cli_where, res.cli_detail = _judge_error(exc)
            return
        text = r.output or ""
        try:
            err = r.stderr or ""
        except ValueError:  # click < 8.2 with stderr mixed in
            err = ""
        if err and err not in text:
            text += err
        after = _tree_listing(case, skip=out)
        after_parent = sorted(os.listdir(self.workdir))
        outside = sorted(set(after.items()) ^ set(before.items()))
        if outside or after_parent != before_parent:
            res.cli, res.cli_detail = "wrote-outside", f"changed outside the output dir: {[k for k, _ in outside][:5]}"
            return
        exc = r.exception
        if exc is not None and not isinstance(exc, SystemExit):
            res.cli, res.cli_error_type, res.cli_where, res.cli_detail = _judge_error(exc)
            if res.cli == "typed-error":  # a typed error that escaped the CLI's handler is still a traceback
                res.cli = "untyped-error"
            return
        if "Traceback" in text:
            res.cli, res.cli_detail = "untyped-error", "traceback printed"
            return
        if r.exit_code == 0:
            got = _read_tree(out) if out.is_dir() else {}
            same = got == t.applied
            if not same and mut.config_edit and not mut.must_fail:
                strip = lambda tree: {k: v for k, v in tree.items() if k != "config.json"}  # noqa: E731
                if strip(got) == strip(t.applied) and "config.json" in got:
                    res.cli = "semantic-change"
                    return
            res.cli = _judge_success(same, mut)
            if not same:
                diff = sorted(k for k in set(got) | set(t.applied) if got.get(k) != t.applied.get(k))
                res.cli_detail = f"apply output differs: {diff[:4]}"
            return
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        if r.exit_code == 1 and len(lines) == 1:
            res.cli = "typed-error"
            res.cli_detail = lines[0][:200]
        else:
            res.cli, res.cli_detail = "bad-message", f"exit {r.exit_code}, {len(lines)} lines: {text.strip()[:200]!r}"

    def run(self, index: int, mut: Mutation, rng: random.Random) -> CaseResult:
        t = self._by_name[mut.target]
        res = CaseResult(index, mut.family, mut.target, mut.desc, api="?")
        start = time.perf_counter()
        case, d = self.materialize(mut)
        if not mut.check_apply:
            self.run_api(t, d, mut, res)
        else:
            res.api = "ok-identical"  # aux files never reach the state dict; judged by apply below
        if mut.check_apply or rng.random() < self.cli_fraction:
            self.run_cli(t, case, d, mut, res)
        res.seconds = time.perf_counter() - start
        return res


# --------------------------------------------------------------------------------------------- report


@dataclass
class Report:
    """Counts by family x outcome, and the failures grouped by (check, outcome, type, where)."""

    cases: int = 0
    seed: int = 0
    seconds: float = 0.0
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    cli_counts: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    max_peak_growth: int | None = None
    max_case_seconds: float = 0.0

    @property
    def n_failures(self) -> int:
        return sum(g["count"] for g in self.failures)

    def table(self) -> str:
        outcomes = sorted({o for fam in self.counts.values() for o in fam})
        w = max([len(f) for f in self.counts] + [6])
        lines = [f"{'family':<{w}} " + " ".join(f"{o:>16}" for o in outcomes)]
        for fam in sorted(self.counts):
            lines.append(f"{fam:<{w}} " + " ".join(f"{self.counts[fam].get(o, 0):>16}" for o in outcomes))
        lines.append(f"cli apply checks: {dict(sorted(self.cli_counts.items()))}")
        lines.append(f"{self.cases} cases in {self.seconds:.1f}s (seed {self.seed}); slowest case {self.max_case_seconds:.2f}s; "
                     f"max peak-RSS growth {self.max_peak_growth} bytes; {self.n_failures} failures in {len(self.failures)} groups")
        for g in self.failures:
            lines.append(f"  FAIL x{g['count']:<4} {g['check']}:{g['outcome']} {g['error_type'] or ''} @ {g['where'] or ''}"
                         f"  e.g. [{g['family']}/{g['target']}] {g['example']}  -> {(g['message'] or '')[:160]}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(results: list[CaseResult], seed: int, seconds: float) -> Report:
    rep = Report(cases=len(results), seed=seed, seconds=seconds)
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    cli: Counter[str] = Counter()
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in results:
        counts[r.family][r.api] += 1
        if r.cli is not None:
            cli[r.cli] += 1
        if r.peak_growth is not None:
            rep.max_peak_growth = max(rep.max_peak_growth or 0, r.peak_growth)
        rep.max_case_seconds = max(rep.max_case_seconds, r.seconds)
        checks = []
        if r.api not in ALLOWED:
            checks.append(("api", r.api, r.error_type, r.where, r.message))
        if r.cli is not None and r.cli not in ALLOWED:
            checks.append(("cli", r.cli, r.cli_error_type, r.cli_where, r.cli_detail))
        for check, outcome, etype, where, msg in checks:
            key = (check, outcome, etype, where) if etype else (check, outcome, r.family)
            g = groups.setdefault(key, {"check": check, "outcome": outcome, "error_type": etype, "where": where,
                                        "count": 0, "family": r.family, "target": r.target, "example": r.desc,
                                        "message": (msg or "")[:300], "case": r.index})
            g["count"] += 1
    rep.counts = {f: dict(c) for f, c in counts.items()}
    rep.cli_counts = dict(cli)
    rep.failures = sorted(groups.values(), key=lambda g: -g["count"])
    return rep


def fuzz(targets: list[Target], cases: int, seed: int = 0, workdir: str | Path | None = None, *,
         progress: Callable[[int, CaseResult], None] | None = None, **fuzzer_kw: Any) -> Report:
    """Run ``cases`` seeded mutations of ``targets``; the same seed gives the same mutations."""
    rng = random.Random(seed)
    start = time.perf_counter()
    results: list[CaseResult] = []
    with contextlib.ExitStack() as stack:
        wd = Path(workdir) if workdir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="deltahub-fuzz-")))
        fz = Fuzzer(targets, wd, **fuzzer_kw)
        base_listing = {t.name: _tree_listing(t.base_dir) for t in targets}
        while len(results) < cases:
            for mut in generate(rng, targets):
                if len(results) >= cases:
                    break
                res = fz.run(len(results), mut, random.Random(rng.random()))
                results.append(res)
                if progress:
                    progress(len(results), res)
        for t in targets:
            if _tree_listing(t.base_dir) != base_listing[t.name]:
                results.append(CaseResult(len(results), "base-dir", t.name, "the base directory changed during the run", api="wrote-outside"))
    return summarize(results, seed, time.perf_counter() - start)


def measure_slack(targets: list[Target], runs: int = 30, workdir: str | Path | None = None) -> dict[str, Any]:
    """Peak-RSS growth of unmutated rebuilds (and CLI applies): what the slack must cover."""
    growth_api, growth_cli = [], []
    with tempfile.TemporaryDirectory(prefix="deltahub-fuzz-slack-") as tmp:
        wd = Path(workdir or tmp)
        for i in range(runs):
            t = targets[i % len(targets)]
            for use_cli, sink in ((False, growth_api), (True, growth_cli)):
                base = _status_kib("VmRSS")
                _reset_peak()
                if use_cli:
                    out = wd / "slack-out"
                    shutil.rmtree(out, ignore_errors=True)
                    cli_apply(t.delta_dir, t.base_dir, out)
                else:
                    rebuild(t.delta_dir, t.base_dir)
                sink.append((_status_kib("VmHWM") or 0) - (base or 0))
    return {"runs": runs, "api_max": max(growth_api), "api_median": sorted(growth_api)[len(growth_api) // 2],
            "cli_max": max(growth_cli), "largest_tensor": max(t.largest_tensor_bytes for t in targets)}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DELTAHUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    ap = argparse.ArgumentParser(prog="python -m deltahub.testing.fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the report (counts + grouped failures) here")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    ap.add_argument("--cli-fraction", type=float, default=0.05)
    ap.add_argument("--slack-mib", type=float, default=DEFAULT_SLACK_BYTES / 1024**2)
    ap.add_argument("--delta", type=Path, help="fuzz this delta directory instead of the built-in tiny corpus (with --base)")
    ap.add_argument("--base", type=Path)
    ap.add_argument("--measure", action="store_true", help="only measure peak-RSS growth of unmutated rebuilds")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="deltahub-fuzz-corpus-") as tmp:
        if args.delta:
            if not args.base:
                ap.error("--delta needs --base")
            targets = [load_target("given", args.delta, args.base, tmp)]
        else:
            targets = build_corpus(tmp)
        if args.measure:
            print(json.dumps(measure_slack(targets), indent=2))
            return 0
        rep = fuzz(targets, args.cases, args.seed, timeout=args.timeout, cli_fraction=args.cli_fraction,
                   slack_bytes=int(args.slack_mib * 1024**2))
    print(rep.table())
    if args.json:
        args.json.write_text(json.dumps(rep.to_json(), indent=2, default=str) + "\n")
    return 1 if rep.n_failures else 0


if __name__ == "__main__":
    sys.exit(main())
