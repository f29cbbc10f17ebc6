"""Reading a delta repo's manifest and safetensors headers without downloading the stored tensors."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import HfApi, hf_hub_download

from ..format.manifest import Manifest
from ..format.spec import MANIFEST_NAME
from ._errors import hub_errors, offline
from ._ids import SHA_RE, parse_model_spec

if TYPE_CHECKING:
    from huggingface_hub.utils import SafetensorsFileMetadata


def remote_info(repo_id: str, revision: str | None = None, token: str | bool | None = None, endpoint: str | None = None,
                cache_dir: str | Path | None = None) -> tuple[Manifest, list[tuple[str, SafetensorsFileMetadata]]]:
    """The manifest and the safetensors headers of a delta repo, without downloading the stored tensors.

    Downloads only ``delta_config.json`` (into the Hub cache) and reads each delta file's header
    with HTTP range requests (``parse_safetensors_file_metadata``). Returns
    ``(manifest, [(filename, SafetensorsFileMetadata), ...])``.
    """
    repo_id, rev = parse_model_spec(repo_id)
    rev = revision or rev
    with hub_errors("info", repo_id, rev, endpoint=endpoint, filename=MANIFEST_NAME):
        path = Path(hf_hub_download(repo_id, MANIFEST_NAME, revision=rev, token=token, cache_dir=cache_dir,
                                    endpoint=endpoint, local_files_only=offline(), library_name="deltahub"))
    manifest = Manifest.load(path.parent)
    sha = path.parent.name if SHA_RE.fullmatch(path.parent.name) else rev  # read the headers of that same commit
    api = HfApi(endpoint=endpoint, token=token)
    headers: list[tuple[str, Any]] = []
    for name in manifest.files:
        if name.endswith(".safetensors"):
            with hub_errors("info", repo_id, sha, endpoint=api.endpoint, filename=name):
                headers.append((name, api.parse_safetensors_file_metadata(repo_id, name, revision=sha, token=token)))
    return manifest, headers
