"""Hugging Face Hub integration: model specs, pushing deltas, pulling and rebuilding fine-tunes.

Everything goes through the real ``huggingface_hub`` client. ``token`` and ``endpoint`` are
passed through as the client takes them (``None`` means the client's own defaults:
``HF_TOKEN`` / the stored login, ``HF_ENDPOINT``), and ``cache_dir`` likewise (``None`` is the
shared Hub cache), so a delta pulled once rebuilds offline (``HF_HUB_OFFLINE=1``).

A delta records the base's repo id *and* the commit sha it was compressed against
(``manifest.base.revision``); :func:`pull` downloads the base at that sha, never at ``main``,
and the content fingerprint is verified while rebuilding. Client exceptions are translated
into :class:`~deltahub.errors.HubError` subclasses (also ``OSError`` s) whose messages name the
repo, the revision and the file, and which carry them as ``repo_id`` / ``revision`` / ``filename``.

Layout (private modules, dependencies one way: ``hub`` -> ``delta``, never back):
``_ids`` (repo-id grammar), ``_errors`` (client exceptions -> typed errors), ``_download``
(snapshots, manifest, base resolution), ``_card`` (model card), ``_push``, ``_pull`` (concurrent
delta + base download, rebuild; registers the Hub opener of ``Delta.from_pretrained``), ``_info`` (manifest + headers without weights).
"""

from __future__ import annotations

from ._card import card_metadata, model_card, model_card_data, pipeline_tag
from ._download import (
    CODE_PATTERNS,
    DELTA_PATTERNS,
    MODEL_PATTERNS,
    ResolvedModel,
    download_delta,
    download_manifest,
    explain_base_mismatch,
    hub_cache_root,
    resolve_base,
    resolve_model,
)
from ._errors import hub_errors, offline
from ._ids import is_hub_id, is_hub_spec, parse_model_spec
from ._info import remote_info
from ._pull import PullResult, fetch_delta_and_base, open_delta_dir, pull, pull_model
from ._push import push_to_hub

__all__ = [
    "CODE_PATTERNS",
    "DELTA_PATTERNS",
    "MODEL_PATTERNS",
    "PullResult",
    "ResolvedModel",
    "card_metadata",
    "download_delta",
    "download_manifest",
    "explain_base_mismatch",
    "fetch_delta_and_base",
    "hub_cache_root",
    "hub_errors",
    "is_hub_id",
    "is_hub_spec",
    "model_card",
    "model_card_data",
    "offline",
    "open_delta_dir",
    "parse_model_spec",
    "pipeline_tag",
    "pull",
    "pull_model",
    "push_to_hub",
    "remote_info",
    "resolve_base",
    "resolve_model",
]
