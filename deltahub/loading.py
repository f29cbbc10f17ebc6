"""``AutoDeltaModel``: a delta (local dir or Hub repo) + its pinned base -> a ``transformers`` model, in one call.

Mirrors PEFT's ``AutoPeftModel.from_pretrained``: the delta repo's ``revision`` and the base's
revision are separate arguments (by default the base is fetched at the exact commit the delta
was compressed against, never at ``main``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["AutoDeltaModel"]


class AutoDeltaModel:
    """Factory for rebuilt fine-tunes; not instantiated (like ``transformers.AutoModel``)."""

    def __init__(self) -> None:  # pragma: no cover - guard
        raise OSError("AutoDeltaModel is a factory: use AutoDeltaModel.from_pretrained(repo_id_or_dir)")

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_dir: str | os.PathLike[str],
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        torch_dtype: torch.dtype | None = None,
        base_model: str | os.PathLike[str] | None = None,
        base_revision: str | None = None,
        check_base: bool = True,
        endpoint: str | None = None,
        progress: bool | None = None,
        **model_kwargs: Any,
    ) -> Any:
        """Load the fine-tune stored as a delta in ``repo_id_or_dir`` as a ``transformers`` model (eval mode).

        Args:
            repo_id_or_dir: a local delta directory, or a Hub repo id ``namespace/name[@revision]``.
            revision: revision of the *delta* repo (branch, tag or sha).
            token, cache_dir, endpoint: as in ``huggingface_hub`` (``None``: its defaults / env vars).
            torch_dtype: dtype of the returned model (default: the fine-tune's stored dtype).
            base_model: override the base (local path or Hub id); default: the base recorded in the delta.
            base_revision: override the pinned base commit (experts; the fingerprint is still checked).
            check_base: verify the base's content fingerprint (default on).
            model_kwargs: passed to the model class's ``from_pretrained``.

        Offline (``HF_HUB_OFFLINE=1``) it works from the Hub cache once delta and base were fetched.
        """
        from .delta import Delta
        from .hub import explain_base_mismatch, is_hub_spec, resolve_base

        delta = Delta.from_pretrained(repo_id_or_dir, revision=revision, token=token, cache_dir=cache_dir, endpoint=endpoint)
        try:
            base = resolve_base(delta.manifest, base_model=base_model, base_revision=base_revision, token=token,
                                cache_dir=cache_dir, endpoint=endpoint, local_ok=not is_hub_spec(repo_id_or_dir))
            with explain_base_mismatch(delta.manifest, base):
                return delta.to_model(base.local_dir, check_base=check_base, torch_dtype=torch_dtype, progress=progress, **model_kwargs)
        finally:
            delta.close()
