"""A delta on disk, and rebuilding the fine-tune from base + delta (streaming, verified, atomic)."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from ._progress import progress_bar
from .codecs import get_codec
from .errors import BaseMismatchError, CodecError, DeltaHubError, ManifestError, MissingFileError, ShapeMismatchError, UnsafePathError, UnsupportedFormatError
from .format.delta_files import DeltaFiles
from .format.digest_cache import CheckpointDigests
from .format.integrity import base_file_sources, verify_aux_files
from .format.io import (Checkpoint, atomic_directory, base_digest, check_output, fingerprint, pipelined, plan_shards, read_with_digest,
                        write_json_atomic, write_safetensors_parallel)
from .format.manifest import Manifest, TensorEntry
from .format.names import is_delta_weights_name, member
from .format.spec import MANIFEST_NAME, dtype_from_name
from .utils.gc_pause import paused_gc
from .utils.scratch import ThreadScratch

#: Output model shards are cut above this size, like transformers' ``max_shard_size``.
DEFAULT_MODEL_SHARD_BYTES = 5 * 1000**3
#: Rebuilt bytes the pipeline may hold ahead of the writer (at least the largest tensor).
PIPELINE_BYTES = 256 * 2**20
#: Base tensors up to this size are read into a per-worker buffer that is reused (no fresh pages per tensor).
SCRATCH_BYTES = 128 * 2**20


# Extension points for the Hub layer (dependency inversion): ``deltahub.hub`` depends on this module
# (it rebuilds with Delta) and registers its downloader / uploader here when imported; this module
# never imports ``deltahub.hub``, so the two never import each other.
_DELTA_OPENERS: list[Callable[..., Path | None]] = []
_DELTA_PUSHER: Callable[..., Any] | None = None


def register_delta_opener(opener: Callable[..., Path | None]) -> Callable[..., Path | None]:
    """Let :meth:`Delta.from_pretrained` open specs that are not local paths: ``opener(spec, revision, *, token,
    cache_dir, endpoint, local_files_only, force_download)`` returns the local delta directory, or ``None``
    if the spec is not its kind. Registering the same opener twice is a no-op."""
    if opener not in _DELTA_OPENERS:
        _DELTA_OPENERS.append(opener)
    return opener


def register_delta_pusher(pusher: Callable[..., Any]) -> Callable[..., Any]:
    """Set the function :meth:`Delta.push_to_hub` calls (``pusher(delta, repo_id, **kwargs)``)."""
    global _DELTA_PUSHER
    _DELTA_PUSHER = pusher
    return pusher


class Delta:
    """A compressed fine-tune: manifest + stored tensors + tokenizer files, in one directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.manifest = Manifest.load(self.directory)  # alias entries (1.3) are checked there
        for name, entry in self.manifest.tensors.items():
            if entry.alias_of is not None:
                continue
            try:
                get_codec(entry.codec)
            except CodecError:
                raise UnsupportedFormatError(
                    f"tensor {name!r} uses codec {entry.codec!r}, which this deltahub does not know (written by a newer version?)",
                    path=self.directory / MANIFEST_NAME,
                ) from None
        self.files = DeltaFiles(self.directory, self.manifest)
        for name, entry in self.manifest.tensors.items():
            if entry.alias_of is None:
                self._check_entry(name, entry)
        self._check_stored_names_unique()

    def _check_stored_names_unique(self) -> None:
        """Each stored tensor belongs to one entry and role (its name is ``<tensor>.<role>``): an entry naming
        another's stored tensors would have one recorded digest checked for both."""
        named_by: dict[str, str] = {}
        for name, entry in self.manifest.tensors.items():
            for role, key in entry.stored.items():
                if key in named_by:
                    raise ManifestError(f"manifest entries {named_by[key]!r} and {name!r} ({role}) both name stored tensor "
                                        f"{key!r}", path=self.directory / MANIFEST_NAME)
                named_by[key] = name

    def _check_entry(self, name: str, entry: TensorEntry) -> None:
        """Header-only validation of one untrusted entry, before any stored byte is read (format_spec.md,
        Security considerations): the codec checks every param and its stored tensors' roles, dtypes
        and shapes against the entry's shape, so decoding allocates O(numel) and fails typed."""
        codec = get_codec(entry.codec)
        where = self.directory / MANIFEST_NAME
        if entry.base_sha256 is None and (codec.needs_base or (entry.codec == "raw" and entry.params.get("mode") == "xor")):
            raise ManifestError(f"tensor {name!r} uses codec {entry.codec!r}, which needs a base tensor, but has no base_sha256", path=where)
        if codec.needs_base and entry.codec != "unchanged" and not dtype_from_name(entry.dtype).is_floating_point:
            raise ManifestError(f"tensor {name!r} is {entry.dtype}, but codec {entry.codec!r} codes deltas of floating-point tensors only", path=where)
        specs = {role: (info.dtype, info.shape) for role, info in self.files.infos(entry.stored).items()}
        try:
            codec.check_decode(entry.params, specs, tuple(entry.shape), dtype_from_name(entry.dtype))
        except CodecError as exc:
            raise type(exc)(f"tensor {name!r}: {exc}", path=where) from None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], revision: str | None = None,
                        token: str | bool | None = None, cache_dir: str | Path | None = None, endpoint: str | None = None, *,
                        local_files_only: bool = False, force_download: bool = False) -> Delta:
        """Open a delta: a local directory, or a Hub repo id (``namespace/name[@rev]``) downloaded to the Hub cache.

        Only the delta is fetched; the base comes later (:meth:`apply`, :func:`deltahub.pull`).
        Hub ids are opened by the opener :mod:`deltahub.hub` registers (:func:`register_delta_opener`);
        ``deltahub.Delta`` always has it, and so does this class once ``deltahub.hub`` was imported.
        """
        spec = pretrained_model_name_or_path
        if isinstance(spec, os.PathLike) or Path(spec).exists():
            return cls(spec)
        for opener in _DELTA_OPENERS:
            path = opener(str(spec), revision, token=token, cache_dir=cache_dir, endpoint=endpoint,
                          local_files_only=local_files_only, force_download=force_download)
            if path is not None:
                return cls(path)
        if not _DELTA_OPENERS and "/" in str(spec):
            raise MissingFileError("not a local delta directory; to open a Hub repo id use deltahub.Delta "
                                   "(or import deltahub.hub first)", path=spec)
        return cls(spec)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Publish this delta as a Hub model repo in one commit, with a model card (see :func:`deltahub.push_to_hub`).

        Needs :mod:`deltahub.hub` (imported by ``deltahub.Delta``), which registers the uploader.
        """
        if _DELTA_PUSHER is None:
            raise DeltaHubError("Delta.push_to_hub needs deltahub.hub: use deltahub.Delta or import deltahub.hub first")
        return _DELTA_PUSHER(self, repo_id, **kwargs)

    # ------------------------------------------------------------------ per tensor

    def reconstruct(self, name: str, base: torch.Tensor | None) -> torch.Tensor:
        """The fine-tuned tensor ``name`` rebuilt from its stored tensors and the base tensor (for an alias entry:
        its target's, decoded with the target's coding; the base tensors are identical by the format's rule)."""
        coded, entry = self.manifest.coded(name)
        return self._rebuild(coded, self.files.stored(entry.stored), base)

    def _rebuild(self, name: str, stored: dict[str, torch.Tensor], base: torch.Tensor | None, *,
                 owned: bool = False) -> torch.Tensor:
        """One tensor from its stored tensors and base tensor; ``owned``: the base buffer is the caller's to
        overwrite (read for this rebuild alone), so codecs may add their delta into it in place."""
        entry = self.manifest.tensors[name]
        codec = get_codec(entry.codec)
        try:
            rebuild = codec.reconstruct_ if owned else codec.reconstruct
            out = rebuild(stored, entry.params, base, tuple(entry.shape), dtype_from_name(entry.dtype))
        except DeltaHubError as exc:
            if name in str(exc):
                raise
            raise type(exc)(f"tensor {name!r}: {exc}", path=self.directory) from None
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError, OverflowError, ZeroDivisionError, MemoryError) as exc:
            # check_decode should make this unreachable; untrusted input never escapes untyped.
            raise CodecError(f"tensor {name!r}: cannot decode ({type(exc).__name__}: {_oneline(exc)})", path=self.directory) from None
        if list(out.shape) != entry.shape:
            raise ShapeMismatchError(f"tensor {name!r} rebuilt as {list(out.shape)}, manifest says {entry.shape}", path=self.directory)
        return out

    def delta_tensor(self, name: str) -> torch.Tensor:
        """The float32 delta of a delta-coded tensor (for resident delta modules; an alias's is its target's)."""
        _, entry = self.manifest.coded(name)
        return get_codec(entry.codec).decode_delta(self.files.stored(entry.stored), entry.params, tuple(entry.shape))

    # ------------------------------------------------------------------ base checks

    def _needs_base(self, entry: TensorEntry) -> bool:
        """Whether the entry decodes against its own base tensor (an alias decodes against its target's)."""
        return (entry.base_sha256 is not None and entry.alias_of is None
                and not (entry.codec == "raw" and entry.params.get("mode") == "full"))

    def check_base_structure(self, base: Checkpoint, *, check_base: bool = True) -> None:
        """Header-only check that ``base`` has every tensor the delta needs, with the recorded shape.

        With ``check_base`` the base must also have exactly the tensors the delta was made
        against (same names, dtypes, shapes); content is verified while streaming.
        """
        m = self.manifest
        self._check_output_size(base)
        for name, entry in m.tensors.items():
            if not self._needs_base(entry):
                continue
            if name not in base:
                raise BaseMismatchError(
                    f"the base has no tensor {name!r}, which the delta was made against "
                    f"(delta base: {m.base.name_or_path}, fingerprint {m.base.fingerprint})",
                    path=base.path,
                )
            info = base.info(name)
            check_base_shape(m, name, info.shape, path=base.path, resizable=True)
            if entry.codec == "raw" and str(info.dtype).removeprefix("torch.") != entry.dtype:
                raise ShapeMismatchError(f"base tensor {name!r} is {info.dtype}, the exact delta needs {entry.dtype}", path=base.path)
        if not check_base:
            return
        expected = {n for n, e in m.tensors.items() if e.base_sha256 is not None} | set(m.base.extra_tensors)
        have = set(base.keys())
        if have != expected:
            extra, missing = sorted(have - expected), sorted(expected - have)
            raise BaseMismatchError(
                f"the base's tensors differ from those the delta was made against ({m.base.name_or_path}): "
                f"{len(extra)} unexpected (e.g. {extra[:3]}), {len(missing)} missing (e.g. {missing[:3]}); "
                + FORCE_HINT,
                path=base.path,
            )

    def _check_output_size(self, base: Checkpoint) -> None:
        """Bound the rebuilt model by what the (trusted) base justifies: a tensor with a same-named,
        same-shaped base tensor is as large as it (times the dtype ratio); all the others together
        (new tensors, resized ones: ``raw`` ``full``, whose zstd frames may expand ~32000x) may add
        at most the base's own size plus :data:`NEW_TENSOR_SLACK_BYTES`."""
        new_bytes = 0
        for name, entry in self.manifest.tensors.items():
            if name in base and list(base.info(name).shape) == entry.shape:
                continue
            new_bytes += _nbytes((name, dtype_from_name(entry.dtype), tuple(entry.shape)))
        limit = base.total_bytes() + NEW_TENSOR_SLACK_BYTES
        if new_bytes > limit:
            raise ManifestError(
                f"the delta declares {new_bytes} bytes of tensors the base has no same-shape counterpart for, more than "
                f"the {limit} a reader accepts (the base's size + {NEW_TENSOR_SLACK_BYTES // 2**20} MiB)",
                path=self.directory / MANIFEST_NAME,
            )

    # ------------------------------------------------------------------ whole model

    def iter_tensors(self, base: Checkpoint, *, check_base: bool = True, dtype: torch.dtype | None = None,
                     workers: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, rebuilt tensor)`` in storage order, verifying each base tensor's sha256.

        Tensors are read, verified and decoded on ``workers`` threads ahead of the consumer
        (:func:`~deltahub.format.io.pipelined`); the output is the same, byte for byte, as one
        tensor at a time. ``dtype`` casts the floating-point tensors (others keep theirs). Base
        digests come from the local digest cache when the base file is unchanged since they were
        computed (:mod:`deltahub.format.digest_cache`); they are still checked against the delta.
        """
        self.check_base_structure(base, check_base=check_base)
        m = self.manifest
        cache = CheckpointDigests(base.files) if check_base else None
        digests: dict[str, str] = {}
        largest = max((_nbytes(self._out_spec(n, dtype)) for n in m.tensors), default=0)
        stream = pipelined(list(m.tensors), lambda n: self._rebuild_one(base, n, cache, dtype), workers=workers,
                           cost=lambda n: _nbytes(self._out_spec(n, dtype)), max_cost=max(largest, PIPELINE_BYTES))
        try:
            with contextlib.closing(stream):  # a consumer that stops early stops the workers too
                for name, (t, digest) in stream:
                    if digest is not None:
                        digests[name] = digest
                    yield name, t
            if check_base:
                self._check_fingerprint(base, digests, cache)
        finally:
            if cache is not None:
                cache.save()  # digests are facts about the file whatever the outcome; saved only if it did not change

    def _rebuild_one(self, base: Checkpoint, name: str, cache: CheckpointDigests | None,
                     dtype: torch.dtype | None, scratch: Callable[[int], torch.Tensor | None] | None = None,
                     ) -> tuple[torch.Tensor, str | None]:
        """One pipeline step (a worker thread): read, verify against the recorded digests, decode, cast.

        An alias entry (format 1.3) checks its own base tensor's digest (it is part of the fingerprint) and is
        rebuilt as its target is, from the target's stored tensors and base tensor: the same bytes. (Decoding
        twice keeps the pipeline's memory bound; the stored bytes are read twice, not stored twice.)
        ``scratch(nbytes)``: a reusable buffer to read the base tensor into (the result may then be a view of
        it, valid until the caller's next call), or None for a fresh one."""
        entry = self.manifest.tensors[name]
        if entry.alias_of is not None:
            digest = None
            if cache is not None and entry.base_sha256 is not None:
                digest = base_digest(base, name, cache)
                check_base_digest(self.manifest, name, digest, path=base.path)
            out, _ = self._rebuild_one(base, entry.alias_of, cache, dtype, scratch)
            return out, digest
        stored = self.files.stored(entry.stored)
        base_t, digest = None, None
        if self._needs_base(entry) and cache is None:
            base_t = base.read(name)
        elif self._needs_base(entry):
            base_t, digest = read_with_digest(base, name, cache, scratch(base.info(name).nbytes) if scratch else None)
        elif cache is not None and entry.base_sha256 is not None:
            digest = base_digest(base, name, cache)
        if cache is not None and entry.base_sha256 is not None:
            check_base_digest(self.manifest, name, digest, path=base.path)
        out = self._rebuild(name, stored, base_t, owned=True)  # base_t: a fresh read, used only here
        if dtype is not None and out.is_floating_point() and out.dtype != dtype:
            out = out.to(dtype)
        return out, digest

    def _out_spec(self, name: str, dtype: torch.dtype | None) -> tuple[str, torch.dtype, tuple[int, ...]]:
        """``(name, dtype, shape)`` of a rebuilt tensor: the fine-tune's dtype, or ``dtype`` for floating ones."""
        e = self.manifest.tensors[name]
        own = dtype_from_name(e.dtype)
        return name, (dtype if dtype is not None and own.is_floating_point else own), tuple(e.shape)

    def _check_fingerprint(self, base: Checkpoint, digests: dict[str, str], cache: CheckpointDigests | None) -> None:
        """The whole-base check after streaming: tensors the delta does not use, fingerprint, and that no base
        file changed while it was read (so cached digests describe the bytes that were used)."""
        m = self.manifest
        for name in m.base.extra_tensors:
            digests[name] = base_digest(base, name, cache)
        fp = fingerprint({n: (base.info(n).dtype, base.info(n).shape, d) for n, d in digests.items()})
        if fp != m.base.fingerprint:
            raise BaseMismatchError(f"base fingerprint {fp} != {m.base.fingerprint} recorded in the delta", path=base.path)
        if cache is not None:
            cache.check_unchanged(base.path)

    @paused_gc()
    def apply(
        self,
        base: str | Path,
        output_dir: str | Path,
        *,
        check_base: bool = True,
        overwrite: bool = False,
        max_shard_size: int = DEFAULT_MODEL_SHARD_BYTES,
        progress: bool | None = None,
        protect: Iterable[str | Path] = (),
        dtype: str | torch.dtype | None = None,
        workers: int | None = None,
    ) -> Path:
        """Write the rebuilt fine-tune as a complete model directory (config, tokenizer, safetensors).

        ``output_dir`` may not be, contain or lie inside the delta or the base (nor one of
        ``protect``): see :func:`~deltahub.format.io.atomic_directory`. ``dtype`` (``"bfloat16"``,
        ``torch.float16``, ...) writes the floating-point tensors in that dtype instead of the
        fine-tune's own, and says so in ``config.json``; ``workers``: pipeline threads (default: the CPUs).
        """
        dtype = _float_dtype(dtype)
        m = self.manifest
        inputs = {"delta": self.directory, "base": base}
        check_output(output_dir, inputs=inputs, protect=protect, overwrite=overwrite)
        with Checkpoint(base) as base_ckpt:
            self.check_base_structure(base_ckpt, check_base=check_base)
            verify_aux_files(self.directory, m)  # format 1.1 file digests, before anything is written
            from_base = base_file_sources(base_ckpt.dir, m, strict=check_base)  # format 1.2
            specs = [self._out_spec(n, dtype) for n in m.tensors]
            shards = plan_shards(specs, max_shard_size)
            total = sum(_nbytes(s) for s in specs)
            with atomic_directory(output_dir, overwrite=overwrite, inputs=inputs, protect=protect) as tmp, progress_bar("apply", total, enabled=progress) as advance:
                weight_map = self._write_shards(base_ckpt, tmp, shards, check_base=check_base, dtype=dtype, workers=workers,
                                                on_written=lambda spec: advance(_nbytes(spec)))
                if len(shards) > 1:
                    write_json_atomic(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
                if m.config is not None:
                    write_json_atomic(tmp / "config.json", _with_dtype(m.config, dtype))
                self._copy_aux_files(tmp, from_base)
        return Path(output_dir)

    def _write_shards(self, base: Checkpoint, out: Path, shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]], *,
                      check_base: bool, dtype: torch.dtype | None, workers: int | None,
                      on_written: Callable[[tuple[str, torch.dtype, tuple[int, ...]]], None]) -> dict[str, str]:
        """Rebuild every tensor into the model files of ``shards`` (worker threads decode and ``pwrite``
        in parallel: :func:`~deltahub.format.io.write_safetensors_parallel`), then check the whole base
        as :meth:`iter_tensors` does. Returns the weight map."""
        cache = CheckpointDigests(base.files) if check_base else None
        digests: dict[str, str] = {}

        # This worker's read buffer (reused: the tensor is written before the worker's next one, and pages
        # already touched are not faulted in again), for tensors up to SCRATCH_BYTES.
        buffers = ThreadScratch(SCRATCH_BYTES)

        def scratch(nbytes: int) -> torch.Tensor | None:
            return buffers.get("base", nbytes)

        def produce(spec: tuple[str, torch.dtype, tuple[int, ...]]) -> torch.Tensor:
            t, digest = self._rebuild_one(base, spec[0], cache, dtype, scratch)
            if digest is not None:
                digests[spec[0]] = digest
            return t

        weight_map: dict[str, str] = {}
        try:
            for i, shard in enumerate(shards, start=1):
                fname = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors_parallel(out / fname, shard, produce, {"format": "pt"}, workers=workers,
                                           on_written=on_written)
                weight_map.update(dict.fromkeys((s[0] for s in shard), fname))
            if check_base:
                self._check_fingerprint(base, digests, cache)
        finally:
            if cache is not None:
                cache.save()
        return weight_map

    def _copy_aux_files(self, out: Path, from_base: dict[str, Path]) -> None:
        """Copy the tokenizer and other aux files of ``files`` (and ``from_base``, the base's checked
        copies of ``base_files``) into ``out`` (a fresh directory).

        Names were checked when the manifest was read (:mod:`deltahub.format.names`: plain names,
        never weights, config or code); each source must be a regular file inside the delta
        directory (no symlink out of it), and nothing apply wrote is ever replaced.
        """
        for fname, src in from_base.items():
            if os.path.lexists(out / fname):
                raise UnsafePathError(f"base file {fname!r} would replace a file of the rebuilt model", path=self.directory)
            shutil.copyfile(src, out / fname)
        for fname in self.manifest.files:
            if is_delta_weights_name(fname):
                continue
            src = member(self.directory, fname, what="aux file", missing_ok=not self.manifest.file_digests)
            if src is None:
                continue  # format 1.0: a listed aux file that is absent is skipped, as before
            dst = out / fname
            if os.path.lexists(dst):
                raise UnsafePathError(f"aux file {fname!r} would replace a file of the rebuilt model", path=self.directory)
            shutil.copyfile(src, dst)

    def state_dict(self, base: str | Path, *, check_base: bool = True, progress: bool | None = None) -> dict[str, torch.Tensor]:
        """All rebuilt tensors in memory."""
        with Checkpoint(base) as base_ckpt:
            total = sum(_nbytes((n, dtype_from_name(e.dtype), tuple(e.shape))) for n, e in self.manifest.tensors.items())
            with progress_bar("rebuild", total, enabled=progress) as advance:
                out = {}
                for name, t in self.iter_tensors(base_ckpt, check_base=check_base):
                    out[name] = t
                    advance(t.numel() * t.element_size())
        return out

    def to_model(self, base: str | Path, *, check_base: bool = True, torch_dtype: torch.dtype | None = None,
                 progress: bool | None = None, dtype: torch.dtype | None = None, **model_kwargs: Any) -> Any:
        """The rebuilt fine-tune as a ``transformers`` model (class from the config's ``architectures``).

        ``dtype`` (transformers' name; ``torch_dtype`` is the older alias) casts the model; default: the
        rebuilt weights' own dtype."""
        torch_dtype = _one_dtype(dtype, torch_dtype)
        if self.manifest.config is None:
            raise UnsupportedFormatError("the delta has no model config, so no transformers model can be built", path=self.directory)
        cls, config = model_class_for(self.manifest.config, {n: tuple(e.shape) for n, e in self.manifest.tensors.items()},
                                      path=self.directory / MANIFEST_NAME)
        sd = self.state_dict(base, check_base=check_base, progress=progress)
        kwargs = dict(model_kwargs)
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        else:
            kwargs["dtype"] = next(iter(sd.values())).dtype if sd else None
        try:
            model = cls.from_pretrained(None, config=config, state_dict=sd, **kwargs)
        except DeltaHubError:
            raise
        except Exception as exc:  # an untrusted config that transformers cannot build: one typed line
            raise UnsupportedFormatError(f"transformers cannot build {cls.__name__} from the delta's config "
                                         f"({type(exc).__name__}: {_oneline(exc)})", path=self.directory) from None
        model.eval()
        return model

    def summary(self) -> dict[str, Any]:
        """Manifest totals plus the format version and base, for ``deltahub info``."""
        m = self.manifest
        # totals are informative (and untrusted): they never override the fields read from the manifest itself.
        return {**m.totals, "format_version": m.format_version, "base": m.base.name_or_path, "fingerprint": m.base.fingerprint}

    def close(self) -> None:
        self.files.close()


# ------------------------------------------------------------------ base verification (apply and resident)

#: How a caller forces a delta onto a base that fails the check.
FORCE_HINT = "pass check_base=False / --ignore-base-mismatch to apply anyway"


def check_base_shape(manifest: Manifest, name: str, shape: Any, *, path: str | Path | None, why: str = "",
                     resizable: bool = False) -> None:
    """The one per-tensor shape rule: a base tensor a delta entry needs has the entry's shape (:class:`ShapeMismatchError`).

    ``resizable`` (rebuilding a model, not patching one in place): the shape the entry's codec decodes
    against instead (``Codec.base_shape``; fewer rows for a ``rowsparse`` resized vocabulary)."""
    _, entry = manifest.coded(name)
    want = list(get_codec(entry.codec).base_shape(entry.params, tuple(entry.shape))) if resizable else list(entry.shape)
    if list(shape) != want:
        raise ShapeMismatchError(f"base tensor {name!r} has shape {list(shape)}, the delta expects {want}"
                                 f" (made against {manifest.base.name_or_path}){why}", path=path)


def check_base_digest(manifest: Manifest, name: str, digest: str | None, *, path: str | Path | None) -> None:
    """The one per-tensor content rule: a base tensor's sha256 is the entry's ``base_sha256`` (:class:`BaseMismatchError`).

    Used while streaming by :meth:`Delta.iter_tensors` and on the in-memory model by
    :func:`deltahub.resident.attach_delta`, so both refuse a wrong base with the same error."""
    expected = manifest.tensors[name].base_sha256
    if expected is not None and digest != expected:
        raise BaseMismatchError(
            f"base tensor {name!r} has sha256 {str(digest)[:16]}…, the delta was made against {expected[:16]}… "
            f"(base {manifest.base.name_or_path}, fingerprint {manifest.base.fingerprint}); {FORCE_HINT}",
            path=path,
        )


#: Bytes of new (or resized) tensors a reader accepts beyond the base's own size (see ``_check_output_size``).
NEW_TENSOR_SLACK_BYTES = 64 * 2**20


def model_class_for(config: Any, shapes: dict[str, tuple[int, ...]], *, path: str | Path | None = None) -> tuple[type, Any]:
    """The ``transformers`` model class and config object for an untrusted config dict.

    ``architectures[0]`` is used only when it names a concrete ``PreTrainedModel`` subclass whose
    ``config_class`` fits the config (never an Auto* class, a tokenizer, or any other attribute of
    ``transformers``); otherwise the causal-LM class registered for the config's ``model_type``.
    The model is first built on the meta device (no memory) and must not hold more parameters than
    the delta's tensors (``shapes``), so a config cannot make ``from_pretrained`` allocate and
    initialize weights the delta does not provide. Every failure is an :class:`UnsupportedFormatError`.
    """
    import transformers

    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise UnsupportedFormatError("the delta's config has no string model_type, so no transformers model can be built", path=path)
    model_type = config["model_type"][:60]
    try:
        cfg = transformers.AutoConfig.for_model(**config)
    except Exception as exc:  # transformers raises ValueError/TypeError/KeyError/... on bad configs
        raise UnsupportedFormatError(f"config of model_type {model_type!r} is not valid for transformers "
                                     f"({type(exc).__name__}: {_oneline(exc)})", path=path) from None
    cls = None
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        try:
            cand = getattr(transformers, archs[0], None)
        except Exception:  # a lazy import failing
            cand = None
        config_class = getattr(cand, "config_class", None)
        if (isinstance(cand, type) and issubclass(cand, transformers.PreTrainedModel)
                and isinstance(config_class, type) and isinstance(cfg, config_class)):
            cls = cand
    if cls is None:
        try:
            cls = transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)]
        except Exception:
            raise UnsupportedFormatError(f"no transformers causal-LM class for model_type {model_type!r}", path=path) from None
    layers = getattr(cfg, "num_hidden_layers", None)
    if isinstance(layers, int) and not 0 <= layers <= len(shapes):
        raise UnsupportedFormatError(f"config has num_hidden_layers={layers} but the delta has {len(shapes)} tensors", path=path)
    try:
        with torch.device("meta"):
            skeleton = cls(cfg)
        have = sum(math.prod(s) for s in shapes.values())
        need = sum(p.numel() for p in skeleton.parameters()) + sum(b.numel() for b in skeleton.buffers())
        mismatched = [k for k, t in skeleton.state_dict().items() if k in shapes and tuple(t.shape) != shapes[k]]
    except Exception as exc:
        raise UnsupportedFormatError(f"transformers cannot build {cls.__name__} from the delta's config "
                                     f"({type(exc).__name__}: {_oneline(exc)})", path=path) from None
    if mismatched:
        k = mismatched[0]
        raise ShapeMismatchError(f"the config makes {k!r} {list(skeleton.state_dict()[k].shape)}, the delta has {list(shapes[k])}", path=path)
    if need > 2 * have + (1 << 24):
        raise UnsupportedFormatError(f"the config describes a model of {need} parameters, far more than the delta's {have}", path=path)
    return cls, cfg


def _oneline(exc: BaseException) -> str:
    """An exception's message on one line, shortened (errors from untrusted input are printed as-is)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


#: What ``apply(dtype=...)`` / ``--dtype`` may write.
OUTPUT_DTYPES = ("float32", "bfloat16", "float16")


def _one_dtype(dtype: torch.dtype | None, torch_dtype: torch.dtype | None) -> torch.dtype | None:
    """``dtype`` or its older alias ``torch_dtype`` (both given: they must agree)."""
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; give one (dtype)")
    return dtype if dtype is not None else torch_dtype


def _float_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """An output dtype given by name or object (one of :data:`OUTPUT_DTYPES`), or None (the fine-tune's own)."""
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")
    if name not in OUTPUT_DTYPES:
        raise ValueError(f"dtype {name[:40]!r} is not one of {', '.join(OUTPUT_DTYPES)}")
    return getattr(torch, name)


def _with_dtype(config: dict[str, Any], dtype: torch.dtype | None) -> dict[str, Any]:
    """``config`` saying the weights are ``dtype``: ``torch_dtype`` / ``dtype`` (those present, else ``torch_dtype``)."""
    if dtype is None:
        return config
    name = str(dtype).removeprefix("torch.")
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
    return {**config, **dict.fromkeys(keys, name)}


def _nbytes(spec: tuple[str, torch.dtype, tuple[int, ...]]) -> int:
    return math.prod(spec[2]) * spec[1].itemsize


@paused_gc()
@paused_gc()  # reading the manifest too: its many small objects would trigger full collections over torch's
def apply_delta(delta: str | Path, base: str | Path, output_dir: str | Path, **kwargs: Any) -> Path:
    """Rebuild the fine-tune from ``base`` + ``delta`` into ``output_dir`` (see :meth:`Delta.apply`)."""
    check_output(output_dir, inputs={"delta": delta, "base": base}, protect=kwargs.get("protect", ()),
                 overwrite=kwargs.get("overwrite", False))  # before even reading the delta
    d = Delta(delta)
    try:
        return d.apply(base, output_dir, **kwargs)
    finally:
        d.close()


@paused_gc()
def load_model(delta: str | Path, base: str | Path, **kwargs: Any) -> Any:
    """The rebuilt fine-tune as a ``transformers`` model (see :meth:`Delta.to_model`)."""
    d = Delta(delta)
    try:
        return d.to_model(base, **kwargs)
    finally:
        d.close()
