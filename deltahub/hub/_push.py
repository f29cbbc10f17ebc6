"""Publishing a delta directory as a Hub model repo, in one commit."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

from ..delta import Delta, register_delta_pusher
from ..format.manifest import Manifest
from ..format.names import member
from ..format.spec import MANIFEST_NAME, WEIGHTS_INDEX_NAME
from ._card import card_metadata, model_card, with_quality_section
from ._errors import hub_errors

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo


def _delta_files(directory: Path, manifest: Manifest) -> dict[str, Path]:
    """Every file of a delta directory that belongs on the Hub (manifest first): repo name -> local file.

    Only regular files inside ``directory`` (checked names, no symlink out of it) are uploaded.
    """
    names = [MANIFEST_NAME, *manifest.files]
    if member(directory, WEIGHTS_INDEX_NAME, what="push", missing_ok=True) is not None:
        names.append(WEIGHTS_INDEX_NAME)
    return {name: member(directory, name, what=f"push: file listed in {MANIFEST_NAME}") for name in dict.fromkeys(names)}  # type: ignore[misc]


def push_to_hub(delta_dir: str | os.PathLike[str] | Delta, repo_id: str, *, private: bool | None = None, revision: str | None = None,
                commit_message: str | None = None, commit_description: str | None = None, token: str | bool | None = None,
                endpoint: str | None = None, create_pr: bool = False, license: str | None = None,
                eval_text: str | os.PathLike[str] | None = None, finetuned: str | os.PathLike[str] | None = None,
                base_model: str | os.PathLike[str] | None = None, eval_kwargs: dict[str, Any] | None = None) -> CommitInfo:
    """Publish a delta directory as a Hub model repo, in one commit, with a generated model card.

    ``create_repo(exist_ok=True)`` (``private=None``: the user's / organization's default
    visibility, as in ``huggingface_hub``), then one commit adding the manifest, the stored
    tensors, the tokenizer files and ``README.md``, and deleting delta shards of an earlier push
    that this delta no longer has. ``revision`` is a branch (created from ``main`` if missing).

    The card: a ``README.md`` in the directory whose metadata says ``library_name: deltahub``
    (a card you edited) is uploaded as-is; any other ``README.md`` there is taken as the
    fine-tune's card, and its ``license`` / ``language`` / ``datasets`` carry over to the generated
    card (:func:`~deltahub.hub.model_card`). ``license`` overrides the license. Returns the ``CommitInfo``.

    ``eval_text`` (a held-out UTF-8 text file): before uploading, measure the delta as ``deltahub eval``
    does (:func:`deltahub.eval.evaluate_delta`; the base from ``base_model`` or the manifest's pin,
    ``finetuned`` for KL / top-1 / errors, ``eval_kwargs`` such as ``block_size`` / ``max_blocks``)
    and put a "Measured quality" table into the generated card (a card of your own gets it appended).
    """
    delta = delta_dir if isinstance(delta_dir, Delta) else Delta(delta_dir)
    directory = delta.directory
    manifest = delta.manifest
    files = _delta_files(directory, manifest)
    readme = member(directory, "README.md", what="push: model card", missing_ok=True)
    meta = card_metadata(readme)
    own_card = readme is not None and meta.get("library_name") == "deltahub" and license is None
    quality = None
    if eval_text is not None:
        from ..eval import evaluate_delta

        quality = evaluate_delta(delta, base=base_model, finetuned=finetuned, text=eval_text, token=token, endpoint=endpoint,
                                 **(eval_kwargs or {}))
    elif finetuned is not None:
        from ..errors import DeltaHubError

        raise DeltaHubError("finetuned= only applies with eval_text=")
    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors("push", repo_id, revision, endpoint=api.endpoint, download=False):
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        existing = set(api.list_repo_files(repo_id, revision=revision))
        ops: list[Any] = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()]
        if own_card and quality is None:
            card: Any = str(readme)
        elif own_card:
            card = with_quality_section(readme.read_text(encoding="utf-8"), quality).encode()  # type: ignore[union-attr]
        else:
            card = model_card(manifest, repo_id, license=license, finetune_card=meta, quality=quality).encode()
        ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
        stale = sorted(f for f in existing - set(files)
                       if (f.startswith("delta") and f.endswith(".safetensors")) or f == WEIGHTS_INDEX_NAME)
        ops += [CommitOperationDelete(path_in_repo=f) for f in stale]
        ratio = manifest.totals.get("finetuned_fp16_bytes", 0) / max(manifest.totals.get("stored_bytes", 0), 1)
        message = commit_message or f"Upload deltahub delta ({', '.join(sorted(manifest.totals.get('by_codec', {})))}; {ratio:.1f}x vs fp16)"
        info = api.create_commit(repo_id, ops, commit_message=message, commit_description=commit_description,
                                 revision=revision, create_pr=create_pr)
    return info  # type: ignore[return-value]


register_delta_pusher(push_to_hub)
