"""``AutoDeltaModel``: a delta (local dir or Hub repo) + its pinned base -> a ``transformers`` model, in one call.

Mirrors ``transformers``' ``AutoModel.from_pretrained`` (same argument names: ``dtype``,
``device_map``, ``local_files_only``, ``force_download``, ``trust_remote_code``) and PEFT's
``AutoPeftModel.from_pretrained``: the delta repo's ``revision`` and the base's revision are
separate arguments (by default the base is fetched at the exact commit the delta was compressed
against, never at ``main``).

Two ways to build the model:

* in memory (default): the rebuilt state dict is handed to the model class (:meth:`Delta.to_model`);
* through a directory (``device_map=``, ``low_cpu_mem_usage=True``, custom code, or ``model_args``):
  the fine-tune is rebuilt once (atomically, with :meth:`Delta.apply`) into the deltahub cache,
  keyed by the delta's content and the base, reused on later calls, and loaded from there with
  the model class's own ``from_pretrained(dir, device_map=..., dtype=...)`` (weights go straight
  to their devices, never all in CPU memory at once).

Custom-code models (``auto_map`` in the config) are opt-in: ``trust_remote_code=True``. The delta
format never carries code (``*.py`` files are refused as aux files), so the modeling code is taken
from the *base* repo (downloaded with its ``*.py`` files at the pinned commit), as ``transformers``
does for the base itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import OutputExistsError, RemoteCodeError, UnsupportedFormatError

if TYPE_CHECKING:
    import torch

    from .delta import Delta
    from .hub import ResolvedModel

__all__ = ["AutoDeltaModel", "rebuilt_cache_dir"]


def rebuilt_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where rebuilt fine-tunes are cached: ``<Hub cache>/../deltahub/rebuilt``.

    The Hub cache is ``cache_dir`` when the call passes one (it wins), else ``$DELTAHUB_CACHE/rebuilt``
    when that is set, else ``HF_HUB_CACHE``'s sibling (``~/.cache/huggingface/deltahub/rebuilt``). The
    rebuilt models sit next to the Hub cache, never inside it (deltahub never writes into the Hub cache).
    """
    from .hub import hub_cache_root

    env = os.environ.get("DELTAHUB_CACHE")
    if env and cache_dir is None:
        return Path(env) / "rebuilt"
    return hub_cache_root(cache_dir).resolve().parent / "deltahub" / "rebuilt"


def _torch_dtype(dtype: Any) -> torch.dtype | None:
    """``None`` / ``"auto"`` -> ``None`` (the checkpoint's stored dtype); ``"bfloat16"`` -> ``torch.bfloat16``."""
    import torch

    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None) if isinstance(dtype, str) else None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype, a torch dtype name or 'auto', not {dtype!r}")
    return value


def _rebuild_key(delta: Delta, base: ResolvedModel, check_base: bool) -> str:
    """A cache key for the rebuilt model: the delta's manifest, its files' sizes and times, the base
    (repo@sha, or local path), ``check_base``."""
    from .format.spec import MANIFEST_NAME

    h = hashlib.sha256()
    h.update((delta.directory / MANIFEST_NAME).read_bytes())
    for name in sorted(delta.manifest.files):  # format 1.0 manifests do not pin every file
        if (delta.directory / name).is_file():
            st = (delta.directory / name).stat()
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    if not check_base:  # an unchecked base: its files are part of what was rebuilt
        for f in sorted(base.local_dir.glob("*.safetensors")):
            st = f.stat()
            h.update(f"base:{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(json.dumps({"base": base.commit_sha or str(base.local_dir.resolve()), "repo": base.repo_id,
                         "check_base": check_base}).encode())
    return h.hexdigest()[:32]


def _materialise(delta: Delta, base: ResolvedModel, *, cache_dir: str | Path | None, check_base: bool,
                 progress: bool | None) -> Path:
    """The rebuilt fine-tune as a model directory in :func:`rebuilt_cache_dir` (built once, atomically)."""
    from .hub import hub_cache_root

    out = rebuilt_cache_dir(cache_dir) / _rebuild_key(delta, base, check_base)
    if (out / "config.json").is_file():
        return out  # complete: apply renames the directory into place only when everything was written
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        delta.apply(base.local_dir, out, check_base=check_base, progress=progress, protect=[hub_cache_root(cache_dir)])
    except OutputExistsError:
        if not (out / "config.json").is_file():  # another process finished first: use its copy
            raise
    return out


def _remote_code_class(config: dict[str, Any], base: ResolvedModel) -> type:
    """The custom model class a config's ``auto_map`` names, loaded from the base's code files."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    auto_map = config.get("auto_map") or {}
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    refs = [v for v in auto_map.values() if isinstance(v, str)]
    ref = next((r for r in refs if archs and r.rsplit(".", 1)[-1] == archs[0]), None) \
        or auto_map.get("AutoModelForCausalLM") or auto_map.get("AutoModel")
    if not isinstance(ref, str):
        raise UnsupportedFormatError("the config's auto_map names no model class (AutoModelForCausalLM / AutoModel)")
    # The config is the delta's (untrusted): a "repo--module.Class" reference to another repo is cut to
    # "module.Class", so only the code files of the base (the repo the user chose) are ever run.
    ref = ref.split("--")[-1]
    if not re.fullmatch(r"[A-Za-z_]\w*\.[A-Za-z_]\w*", ref):
        raise UnsupportedFormatError(f"the config's auto_map class {ref[:80]!r} is not of the form module.Class")
    return get_class_from_dynamic_module(ref, str(base.local_dir))


class AutoDeltaModel:
    """Factory for rebuilt fine-tunes; not instantiated (like ``transformers.AutoModel``)."""

    def __init__(self) -> None:  # pragma: no cover - guard
        raise OSError("AutoDeltaModel is a factory: use AutoDeltaModel.from_pretrained(pretrained_model_name_or_path)")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str] | None = None,
        *model_args: Any,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        dtype: torch.dtype | str | None = None,
        device_map: Any = None,
        trust_remote_code: bool = False,
        base_model: str | os.PathLike[str] | None = None,
        base_revision: str | None = None,
        check_base: bool = True,
        endpoint: str | None = None,
        progress: bool | None = None,
        mode: str = "rebuild",
        adapter_name: str = "default",
        **model_kwargs: Any,
    ) -> Any:
        """Load the fine-tune stored as a delta as a ``transformers`` model (eval mode).

        Args:
            pretrained_model_name_or_path: a local delta directory, or a Hub repo id ``namespace/name[@revision]``.
            model_args: passed to the model class's ``from_pretrained`` (loads through a directory).
            revision: revision of the *delta* repo (branch, tag or sha).
            token, cache_dir, endpoint: as in ``huggingface_hub`` (``None``: its defaults / env vars).
            local_files_only, force_download: as in ``huggingface_hub``, for the delta *and* the base downloads.
            dtype: dtype of the returned model: a ``torch.dtype``, its name, or ``"auto"`` / ``None``
                (the checkpoint's dtype: the fine-tune's stored dtype). ``torch_dtype`` is a deprecated alias.
            device_map: as in ``transformers`` (e.g. ``"auto"``): the fine-tune is rebuilt once into the
                deltahub cache (:func:`rebuilt_cache_dir`) and loaded from there. ``low_cpu_mem_usage=True`` too.
            trust_remote_code: allow a config with ``auto_map`` (custom modeling code); the code is the base repo's.
            base_model: override the base (local path or Hub id); default: the base recorded in the delta.
            base_revision: override the pinned base commit (experts; the fingerprint is still checked).
            check_base: verify the base's content fingerprint (default on).
            mode: ``"rebuild"`` (a full fine-tune) or ``"resident"``: the pinned base with this delta attached
                as adapter ``adapter_name`` (compressed, :mod:`deltahub.resident`; attach more with ``attach_delta``).
            model_kwargs: passed to the model class's ``from_pretrained``.

        Offline (``HF_HUB_OFFLINE=1``) it works from the Hub cache once delta and base were fetched.
        """
        from .delta import Delta
        from .hub import (  # also registers the Hub opener
            CODE_PATTERNS,
            explain_base_mismatch,
            is_hub_spec,
            resolve_base,
        )

        pretrained_model_name_or_path, dtype = _legacy_names(pretrained_model_name_or_path, dtype, model_kwargs)
        torch_dtype = _torch_dtype(dtype)
        low_cpu_mem_usage = bool(model_kwargs.pop("low_cpu_mem_usage", False))
        spec = pretrained_model_name_or_path
        dl = {"local_files_only": local_files_only, "force_download": force_download}

        delta = Delta.from_pretrained(spec, revision, token=token, cache_dir=cache_dir, endpoint=endpoint, **dl)
        try:
            config = delta.manifest.config
            custom = isinstance(config, dict) and bool(config.get("auto_map"))
            if custom and not trust_remote_code:
                raise RemoteCodeError(f"{spec} uses custom modeling code (auto_map in its config): pass trust_remote_code=True "
                                      "to run the base repo's code, after reading it")
            base = resolve_base(delta.manifest, base_model=base_model, base_revision=base_revision, token=token, cache_dir=cache_dir,
                                endpoint=endpoint, local_ok=not is_hub_spec(spec), extra_patterns=CODE_PATTERNS if custom else None, **dl)
            if mode not in ("rebuild", "resident"):
                raise ValueError(f"mode must be 'rebuild' or 'resident', got {mode!r}")
            if mode == "resident":
                from .resident import load_resident

                return load_resident(base.local_dir, {adapter_name: delta}, torch_dtype, check_base=check_base, **model_kwargs)
            with explain_base_mismatch(delta.manifest, base):
                if device_map is None and not low_cpu_mem_usage and not custom and not model_args:
                    return delta.to_model(base.local_dir, check_base=check_base, torch_dtype=torch_dtype, progress=progress,
                                          **model_kwargs)
                out = _materialise(delta, base, cache_dir=cache_dir, check_base=check_base, progress=progress)
                model_cls = _remote_code_class(config, base) if custom else _model_class(delta)  # type: ignore[arg-type]
                kwargs = dict(model_kwargs)
                if device_map is not None:
                    kwargs["device_map"] = device_map
                model = model_cls.from_pretrained(out, *model_args, dtype=torch_dtype or "auto", **kwargs)
                model.eval()
                return model
        finally:
            delta.close()


def _legacy_names(spec: Any, dtype: Any, model_kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """Accept the old keyword names (``repo_id_or_dir``, ``torch_dtype``) with a FutureWarning, as transformers does."""
    if "repo_id_or_dir" in model_kwargs:  # the old name of the first argument
        warnings.warn("repo_id_or_dir= is deprecated: use pretrained_model_name_or_path", FutureWarning, stacklevel=3)
        spec = model_kwargs.pop("repo_id_or_dir")
    if spec is None:
        raise TypeError("from_pretrained() missing the delta: pretrained_model_name_or_path")
    if "torch_dtype" in model_kwargs:
        warnings.warn("torch_dtype= is deprecated: use dtype= (as transformers does)", FutureWarning, stacklevel=3)
        alias = model_kwargs.pop("torch_dtype")
        dtype = alias if dtype is None else dtype
    return spec, dtype


def _model_class(delta: Any) -> type:
    """The (validated) transformers class for a delta's config, for loading a rebuilt directory."""
    from .delta import model_class_for

    config = delta.manifest.config
    if config is None:
        raise UnsupportedFormatError("the delta has no model config, so no transformers model can be built", path=delta.directory)
    model_cls, _ = model_class_for(config, {n: tuple(e.shape) for n, e in delta.manifest.tensors.items()}, path=delta.directory)
    return model_cls
