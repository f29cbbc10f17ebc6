"""deltahub: store fine-tuned LLMs as compressed deltas against their base model.

One public API, imported lazily (``import deltahub`` loads neither torch, transformers nor
huggingface_hub; each name is imported on first use, like ``huggingface_hub``'s)::

    import deltahub

    deltahub.compress(base, finetuned, "delta/")               # fine-tune -> delta directory
    deltahub.push_to_hub("delta/", "me/my-delta")              # delta directory -> Hub repo
    deltahub.AutoDeltaModel.from_pretrained("me/my-delta")     # Hub repo or directory -> model in memory
    deltahub.pull("me/my-delta", "model/")                     # Hub repo -> rebuilt model directory
    deltahub.apply_delta("delta/", base, "model/")             # local delta -> rebuilt model directory
    deltahub.load_resident("delta/", base)                     # several deltas on one base (adapter-style)
    deltahub.export_peft("delta/", "lora/", rank=64)            # a PEFT LoRA adapter for vLLM / SGLang / TGI

Which call is for what:

* a model **in memory**: :meth:`AutoDeltaModel.from_pretrained` (local directory or Hub id; base
  fetched at the pinned commit; ``dtype``, ``device_map``, ``local_files_only``... as in transformers);
* **from the Hub to a directory**: :func:`pull`;
* **a local delta to a directory**: :func:`apply_delta`, or :meth:`Delta.apply` on an opened
  :class:`Delta` (``Delta.from_pretrained`` opens a directory or a Hub id);
* publish: :func:`push_to_hub` / :meth:`Delta.push_to_hub`; compress: :func:`compress` with a
  :class:`Policy` of :class:`Rule` s.

Lower-level, kept for existing code: ``deltahub.delta.load_model`` and :meth:`Delta.to_model`
(a model from a local delta and an already local base), ``deltahub.hub.pull_model`` (:func:`pull`
returning details). Every deliberate failure is a :class:`DeltaHubError`; Hub failures are
:class:`HubError` s, which are also ``OSError`` s, with ``huggingface_hub``'s names
(:class:`RepositoryNotFoundError`, :class:`RevisionNotFoundError`, :class:`EntryNotFoundError`, ...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .compression import compress
    from .delta import Delta, apply_delta
    from .errors import (
        AuthenticationError,
        BaseMismatchError,
        CodecError,
        CorruptFileError,
        DeltaHubError,
        DownloadError,
        EntryNotFoundError,
        ExportError,
        GatedRepoError,
        HubError,
        IntegrityError,
        InvalidCodecParamsError,
        LocalEntryNotFoundError,
        ManifestError,
        MissingFileError,
        OutputExistsError,
        OutputWriteError,
        RemoteCodeError,
        RemoteFileNotFoundError,
        RepoNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        ShapeMismatchError,
        UnsafeOutputError,
        UnsafePathError,
        UnsupportedFormatError,
    )
    from .eval import evaluate_delta
    from .export import export_peft
    from .hub import pull, push_to_hub
    from .loading import AutoDeltaModel
    from .policy import Policy, Rule
    from .resident import load_resident

_ERRORS = (
    "AuthenticationError", "BaseMismatchError", "CodecError", "CorruptFileError", "DeltaHubError", "DownloadError",
    "EntryNotFoundError", "ExportError", "GatedRepoError", "HubError", "IntegrityError", "InvalidCodecParamsError", "LocalEntryNotFoundError",
    "ManifestError", "MissingFileError", "OutputExistsError", "OutputWriteError", "RemoteCodeError", "RemoteFileNotFoundError",
    "RepoNotFoundError", "RepositoryNotFoundError", "RevisionNotFoundError", "ShapeMismatchError", "UnsafeOutputError",
    "UnsafePathError", "UnsupportedFormatError",
)

# name -> submodule. ``Delta`` comes through ``.hub`` so its ``from_pretrained`` / ``push_to_hub`` know the Hub.
_LAZY: dict[str, str] = {
    "AutoDeltaModel": ".loading",
    "Delta": ".hub",
    "compress": ".compression",
    "evaluate_delta": ".eval",
    "export_peft": ".export",
    "apply_delta": ".delta",
    "pull": ".hub",
    "push_to_hub": ".hub",
    "Policy": ".policy",
    "Rule": ".policy",
    "load_resident": ".resident",
    **dict.fromkeys(_ERRORS, ".errors"),
}

__all__ = [
    "AutoDeltaModel",
    "Delta",
    "Policy",
    "Rule",
    "__version__",
    "apply_delta",
    "compress",
    "evaluate_delta",
    "export_peft",
    "load_resident",
    "pull",
    "push_to_hub",
    "AuthenticationError",
    "BaseMismatchError",
    "CodecError",
    "CorruptFileError",
    "DeltaHubError",
    "DownloadError",
    "EntryNotFoundError",
    "ExportError",
    "GatedRepoError",
    "HubError",
    "IntegrityError",
    "InvalidCodecParamsError",
    "LocalEntryNotFoundError",
    "ManifestError",
    "MissingFileError",
    "OutputExistsError",
    "OutputWriteError",
    "RemoteCodeError",
    "RemoteFileNotFoundError",
    "RepoNotFoundError",
    "RepositoryNotFoundError",
    "RevisionNotFoundError",
    "ShapeMismatchError",
    "UnsafeOutputError",
    "UnsafePathError",
    "UnsupportedFormatError",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name], __name__)
        value = getattr(module, name) if name != "Delta" else importlib.import_module(".delta", __name__).Delta
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
