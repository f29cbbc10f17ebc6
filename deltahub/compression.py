"""``compress``: (base, fine-tune) checkpoints -> a delta directory, streaming tensor by tensor.

Memory holds one fine-tuned tensor, its base tensor, their codec output and at most one
output shard of stored tensors; the base fingerprint is computed from the same reads.
"""

from __future__ import annotations

import math
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from . import __version__
from ._progress import progress_bar
from .codecs import EncodeInput, get_codec
from .codecs.unchanged import same_bits
from .errors import CodecError, DeltaHubError
from .format.delta_files import DeltaShardWriter
from .format.io import Checkpoint, atomic_directory, fingerprint, prefetch, read_with_digest, write_json_atomic
from .format.manifest import BaseInfo, Manifest, TensorEntry
from .format.spec import AUX_FILE_PATTERNS, DEFAULT_MAX_SHARD_BYTES, MANIFEST_NAME, dtype_name
from .policy import Policy

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _stats(codec: Any, enc: Any, inp: EncodeInput, shape: tuple[int, ...]) -> dict[str, float]:
    """Delta norm and reconstruction error norm of a lossy delta codec (for the reports)."""
    approx = codec.decode_delta(enc.tensors, enc.params, shape)
    delta = inp.delta
    d2 = float(delta.pow(2).sum(dtype=torch.float64))
    e2 = float((approx - delta).pow(2).sum(dtype=torch.float64))
    return {"delta_l2": math.sqrt(d2), "error_l2": math.sqrt(e2)}


def compress(
    base: str | Path,
    finetuned: str | Path,
    output_dir: str | Path,
    *,
    codec: str = "bitdelta",
    params: dict[str, Any] | None = None,
    policy: Policy | None = None,
    overwrite: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
    base_name_or_path: str | None = None,
    base_revision: str | None = None,
    finetuned_name_or_path: str | None = None,
    finetuned_revision: str | None = None,
    compute_stats: bool = True,
    progress: bool | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
) -> Manifest:
    """Compress ``finetuned`` against ``base`` into ``output_dir``.

    Each model is a local model dir or ``.safetensors`` file, or a Hub id ``namespace/name[@revision]``
    (not an existing path), downloaded with ``snapshot_download`` (``token``, ``cache_dir``,
    ``endpoint`` as in huggingface_hub); the base's repo id and resolved commit sha are recorded
    so a pull fetches exactly that base. ``codec``/``params`` is the main codec applied by the
    default policy (transformer-block matrices); pass a :class:`~deltahub.policy.Policy` for
    per-pattern rules. The output is written to a temporary directory and renamed when complete.
    """
    hub_kw = {"token": token, "cache_dir": cache_dir, "endpoint": endpoint}
    base, base_name_or_path, base_revision = _resolve_input(base, base_name_or_path, base_revision, role="base", **hub_kw)
    finetuned, finetuned_name_or_path, finetuned_revision = _resolve_input(finetuned, finetuned_name_or_path, finetuned_revision, role="fine-tune", **hub_kw)
    policy = policy or Policy(codec=codec, params=dict(params or {}))
    base_ckpt, ft_ckpt = Checkpoint(base), Checkpoint(finetuned)
    validated: dict[tuple[str, str], dict[str, Any]] = {}

    def resolve(codec_name: str, p: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        key = (codec_name, repr(sorted(p.items())))
        c = get_codec(codec_name)
        if key not in validated:
            validated[key] = c.validate_params(p)
        return c, dict(validated[key])

    # Validate every codec named up front, so a typo fails before any work.
    resolve(policy.codec, policy.params)
    for rule in policy.rules:
        resolve(rule.codec, rule.params)
    resolve("raw", policy.raw_params)

    names = ft_ckpt.keys()
    entries: dict[str, TensorEntry] = {}
    base_digests: dict[str, str] = {}
    total_bytes = sum(ft_ckpt.info(n).nbytes for n in names)
    with atomic_directory(output_dir, overwrite=overwrite) as tmp, progress_bar("compress", total_bytes, enabled=progress) as advance:
        writer = DeltaShardWriter(tmp, max_shard_size)

        def load(name: str) -> tuple[torch.Tensor, torch.Tensor | None, str | None]:
            ft_t = ft_ckpt.read(name)
            if name not in base_ckpt:
                return ft_t, None, None
            return (ft_t, *read_with_digest(base_ckpt, name))

        for name, (ft_t, base_t, digest) in prefetch(names, load):
            info = ft_ckpt.info(name)
            if digest is not None:
                base_digests[name] = digest
            codec_name, p = policy.choose(name, len(info.shape))
            c, p = resolve(codec_name, p)
            compatible = base_t is not None and base_t.shape == ft_t.shape and info.dtype in _FLOATS and base_t.dtype in _FLOATS
            if base_t is not None and same_bits(base_t, ft_t):
                c, p = resolve("unchanged", {})
            elif c.needs_base and not compatible:
                # No usable base counterpart (new tensor, resized vocabulary, integer buffer): keep it exact.
                c, p = resolve("raw", policy.raw_params)
            inp = EncodeInput(name=name, finetuned=ft_t, base=base_t)
            try:
                enc = c.encode(inp, p)
            except DeltaHubError:
                raise
            except (RuntimeError, ValueError) as exc:
                raise CodecError(f"tensor {name!r}: codec {c.name!r} failed: {exc}") from exc
            stored = {role: f"{name}.{role}" for role in enc.tensors}
            entry = TensorEntry(
                codec=c.name,
                shape=list(info.shape),
                dtype=dtype_name(info.dtype),
                params=enc.params,
                stored=stored,
                stored_bytes=enc.nbytes,
                base_sha256=base_digests.get(name),
            )
            if compute_stats and c.needs_base and c.name != "unchanged":
                entry.stats = enc.stats or _stats(c, enc, inp, tuple(info.shape))
            writer.add({stored[r]: t for r, t in enc.tensors.items()}, c.name)
            entries[name] = entry
            del ft_t, base_t, inp, enc
            advance(info.nbytes)
        # Base tensors the fine-tune dropped still belong to the base's fingerprint.
        extra: dict[str, dict[str, Any]] = {}
        for name in base_ckpt.keys():
            if name not in base_digests:
                binfo = base_ckpt.info(name)
                base_digests[name] = read_with_digest(base_ckpt, name)[1]
                extra[name] = {"dtype": dtype_name(binfo.dtype), "shape": list(binfo.shape), "sha256": base_digests[name]}
        fp = fingerprint({n: (base_ckpt.info(n).dtype, base_ckpt.info(n).shape, base_digests[n]) for n in base_ckpt.keys()})
        files = writer.finish()
        aux = _copy_aux_files(ft_ckpt.dir, tmp)
        manifest = Manifest(
            base=BaseInfo(
                name_or_path=base_name_or_path or str(base),
                fingerprint=fp,
                revision=base_revision,
                extra_tensors=extra,
            ),
            tensors=entries,
            config=ft_ckpt.config(),
            finetuned={"name_or_path": finetuned_name_or_path or str(finetuned), "revision": finetuned_revision},
            totals=totals(entries, ft_ckpt),
            files=sorted(files + aux),
            created_with=f"deltahub {__version__}",
        )
        write_json_atomic(tmp / MANIFEST_NAME, manifest.to_dict())
    base_ckpt.close()
    ft_ckpt.close()
    return manifest


def _resolve_input(spec: str | Path, name: str | None, revision: str | None, *, token: str | bool | None,
                   cache_dir: str | Path | None, endpoint: str | None, role: str) -> tuple[str | Path, str | None, str | None]:
    """Local paths pass through; a Hub id is downloaded and becomes ``(local dir, repo id, commit sha)``.

    ``revision`` (when the id has no ``@rev``) is the revision to download; the recorded
    revision is always the resolved commit sha.
    """
    if isinstance(spec, Path) or Path(spec).exists():
        return spec, name, revision
    from .hub import is_hub_spec, parse_model_spec, resolve_model

    if not is_hub_spec(spec):
        return spec, name, revision  # Checkpoint reports the missing path
    resolved = resolve_model(spec, revision=parse_model_spec(str(spec))[1] or revision, token=token, cache_dir=cache_dir, endpoint=endpoint, role=role)
    return resolved.local_dir, name or resolved.repo_id, resolved.commit_sha or revision


def _copy_aux_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer and generation-config files of the fine-tune; returns their names."""
    copied = []
    for pattern in AUX_FILE_PATTERNS:
        for p in sorted(src.glob(pattern)):
            if p.is_file():
                shutil.copy2(p, dst / p.name)
                copied.append(p.name)
    return copied


def totals(entries: dict[str, TensorEntry], ft_ckpt: Checkpoint | None = None) -> dict[str, Any]:
    """Manifest totals: parameters, stored bytes, fine-tune bytes, and the same per codec."""
    by_codec: dict[str, dict[str, float]] = defaultdict(lambda: {"tensors": 0, "parameters": 0, "stored_bytes": 0})
    params = stored = ft_bytes = 0
    for e in entries.values():
        n = math.prod(e.shape)
        size = n * torch.empty((), dtype=getattr(torch, e.dtype)).element_size()
        params += n
        stored += e.stored_bytes
        ft_bytes += size
        c = by_codec[e.codec]
        c["tensors"] += 1
        c["parameters"] += n
        c["stored_bytes"] += e.stored_bytes
    return {
        "parameters": params,
        "stored_bytes": stored,
        "finetuned_bytes": ft_bytes,
        "finetuned_fp16_bytes": 2 * params,
        "by_codec": dict(sorted(by_codec.items())),
    }
