"""Tests for deltahub.testing.hub_server, driven by the real ``huggingface_hub`` client."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from huggingface_hub import (  # noqa: E402
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (  # noqa: E402
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from deltahub.testing.fixtures import configure_hf_client, hub_env, hub_server, hub_server_factory  # noqa: E402,F401
from deltahub.testing.hub_server import HubServer, git_blob_sha1, is_loopback_host, main  # noqa: E402

REPO = "alice/tiny-model"
FILES = {".gitattributes", "README.md", "config.json", "model.safetensors", "sub/notes.txt"}


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    """A small model folder: safetensors weights, a json config, a README with YAML, a subfolder."""
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    torch.manual_seed(0)
    save_file({"weight": torch.randn(4, 8), "bias": torch.zeros(8)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"hidden_size": 8, "layers": 1}))
    (folder / "README.md").write_text("---\nlicense: mit\ntags:\n- test\n---\n# Tiny model\n")
    (folder / "sub" / "notes.txt").write_text("hello from a subfolder\n")
    return folder


def _api(server: HubServer, token: str | bool = False) -> HfApi:
    return HfApi(endpoint=server.url, token=token)


def _upload(server: HubServer, folder: Path, repo_id: str = REPO) -> Any:
    api = _api(server)
    api.create_repo(repo_id, exist_ok=True)
    return api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="add model")


def _http(
    method: str, url: str, headers: dict[str, str] | None = None, body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Raw HTTP call (stdlib) returning (status, headers, body) without raising on 4xx/5xx."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


# ------------------------------------------------------------------------------------------------


def test_create_repo_conflict_exist_ok_and_types(hub_env: HubServer, tmp_path: Path) -> None:
    api = _api(hub_env)
    url = api.create_repo(REPO)
    assert url.repo_id == REPO and url.repo_type == "model"
    assert str(url) == f"{hub_env.url}/{REPO}"

    with pytest.raises(HfHubHTTPError) as exc:
        api.create_repo(REPO)
    assert exc.value.response.status_code == 409
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO

    # Name without namespace lands in the server user's namespace (like the Hub).
    assert api.create_repo("solo").repo_id == f"{hub_env.username}/solo"
    assert api.model_info("solo").id == f"{hub_env.username}/solo"

    # Datasets live in their own namespace of repos.
    ds = api.create_repo(REPO, repo_type="dataset")
    assert ds.repo_type == "dataset" and str(ds).endswith(f"/datasets/{REPO}")
    api.upload_file(path_or_fileobj=b"a,b\n1,2\n", path_in_repo="train.csv", repo_id=REPO, repo_type="dataset")
    path = hf_hub_download(REPO, "train.csv", repo_type="dataset", endpoint=hub_env.url, cache_dir=tmp_path / "c")
    assert Path(path).read_bytes() == b"a,b\n1,2\n"
    assert "train.csv" in api.list_repo_files(REPO, repo_type="dataset")
    assert "train.csv" not in api.list_repo_files(REPO)

    api.delete_repo("solo")
    assert not api.repo_exists("solo")
    api.delete_repo("solo", missing_ok=True)


def test_upload_folder_is_one_commit_with_lfs_and_listings(hub_env: HubServer, model_folder: Path) -> None:
    api = _api(hub_env)
    commit = _upload(hub_env, model_folder)
    assert len(commit.oid) == 40 and commit.commit_url.endswith(f"/{REPO}/commit/{commit.oid}")

    history = api.list_repo_commits(REPO)
    assert [c.title for c in history] == ["add model", "initial commit"]
    assert history[0].commit_id == commit.oid

    info = api.model_info(REPO, files_metadata=True)
    assert info.sha == commit.oid and info.id == REPO and info.private is False
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == FILES
    weights = (model_folder / "model.safetensors").read_bytes()
    st = siblings["model.safetensors"]
    assert st.lfs is not None and st.lfs.sha256 == hashlib.sha256(weights).hexdigest()
    assert st.size == st.lfs.size == len(weights)
    config_bytes = (model_folder / "config.json").read_bytes()
    assert siblings["config.json"].lfs is None
    assert siblings["config.json"].blob_id == git_blob_sha1(config_bytes)
    # LFS content is stored by sha256 on disk.
    assert (hub_env.root / "blobs" / hashlib.sha256(weights).hexdigest()).read_bytes() == weights

    assert sorted(api.list_repo_files(REPO)) == sorted(FILES)
    top = {e.path: e for e in api.list_repo_tree(REPO)}
    assert set(top) == {".gitattributes", "README.md", "config.json", "model.safetensors", "sub"}
    assert isinstance(top["sub"], RepoFolder) and isinstance(top["model.safetensors"], RepoFile)
    assert top["model.safetensors"].lfs.sha256 == st.lfs.sha256
    assert [e.path for e in api.list_repo_tree(REPO, path_in_repo="sub")] == ["sub/notes.txt"]
    recursive = {e.path for e in api.list_repo_tree(REPO, recursive=True)}
    assert recursive == FILES | {"sub"}
    expanded = {e.path: e for e in api.list_repo_tree(REPO, expand=True)}
    assert expanded["config.json"].last_commit.oid == commit.oid
    assert expanded[".gitattributes"].last_commit.title == "initial commit"
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(REPO, path_in_repo="missing-dir"))

    paths = api.get_paths_info(REPO, ["config.json", "sub", "nope.txt"])
    assert {type(p).__name__: p.path for p in paths} == {"RepoFile": "config.json", "RepoFolder": "sub"}
    assert api.file_exists(REPO, "sub/notes.txt") and not api.file_exists(REPO, "sub/other.txt")

    # Re-uploading identical content is a no-op on the client side (remote oids match).
    again = api.upload_folder(folder_path=model_folder, repo_id=REPO)
    assert again.oid == commit.oid


def test_hf_hub_download_and_snapshot_download_roundtrip(
    hub_env: HubServer, model_folder: Path, tmp_path: Path
) -> None:
    commit = _upload(hub_env, model_folder)
    cache = tmp_path / "cache"
    for rel in FILES - {".gitattributes"}:
        path = hf_hub_download(REPO, rel, endpoint=hub_env.url, cache_dir=cache, token=False)
        assert Path(path).read_bytes() == (model_folder / rel).read_bytes()
        assert f"snapshots/{commit.oid}/" in Path(path).as_posix()

    snap = Path(snapshot_download(REPO, endpoint=hub_env.url, cache_dir=tmp_path / "snap_cache", token=False))
    assert snap.name == commit.oid
    for rel in FILES - {".gitattributes"}:
        assert (snap / rel).read_bytes() == (model_folder / rel).read_bytes()

    local = Path(snapshot_download(REPO, endpoint=hub_env.url, local_dir=tmp_path / "local", token=False))
    assert (local / "model.safetensors").read_bytes() == (model_folder / "model.safetensors").read_bytes()

    # Code that passes neither endpoint nor cache_dir reaches the local server via the patched constants.
    import huggingface_hub

    implicit = huggingface_hub.hf_hub_download(REPO, "config.json")
    assert Path(implicit).is_relative_to(Path(constants.HF_HUB_CACHE).resolve())
    info = huggingface_hub.upload_file(path_or_fileobj=b"implicit\n", path_in_repo="implicit.txt", repo_id=REPO)
    assert info.oid != commit.oid and str(info).startswith(hub_env.url)


def test_old_commits_stay_readable_and_parent_commit(hub_env: HubServer, model_folder: Path, tmp_path: Path) -> None:
    api = _api(hub_env)
    first = _upload(hub_env, model_folder)
    second = api.create_commit(
        REPO,
        operations=[
            CommitOperationAdd("config.json", b'{"hidden_size": 16}'),
            CommitOperationDelete("README.md"),
        ],
        commit_message="v2",
        parent_commit=first.oid,
    )
    assert second.oid != first.oid

    old = hf_hub_download(REPO, "config.json", revision=first.oid, endpoint=hub_env.url, cache_dir=tmp_path / "a")
    new = hf_hub_download(REPO, "config.json", endpoint=hub_env.url, cache_dir=tmp_path / "b")
    assert Path(old).read_bytes() == (model_folder / "config.json").read_bytes()
    assert Path(new).read_bytes() == b'{"hidden_size": 16}'
    assert api.model_info(REPO, revision=first.oid).sha == first.oid
    assert "README.md" in api.list_repo_files(REPO, revision=first.oid)
    assert "README.md" not in api.list_repo_files(REPO)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "README.md", endpoint=hub_env.url, cache_dir=tmp_path / "c")
    snap = Path(snapshot_download(REPO, revision=first.oid, endpoint=hub_env.url, cache_dir=tmp_path / "d"))
    assert (snap / "README.md").is_file()
    # Short shas resolve too.
    assert api.model_info(REPO, revision=first.oid[:10]).sha == first.oid

    # A stale parent commit is refused (HTTP 412), the current one is accepted.
    with pytest.raises(HfHubHTTPError) as exc:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO, parent_commit=first.oid)
    assert exc.value.response.status_code == 412
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO, parent_commit=second.oid)

    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="0" * 40, endpoint=hub_env.url, cache_dir=tmp_path / "e")


def test_branches_tags_and_pull_requests(hub_env: HubServer, model_folder: Path, tmp_path: Path) -> None:
    api = _api(hub_env)
    first = _upload(hub_env, model_folder)
    api.create_branch(REPO, branch="dev")
    api.create_branch(REPO, branch="dev", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_branch(REPO, branch="dev")
    assert exc.value.response.status_code == 409

    on_dev = api.upload_file(path_or_fileobj=b"dev only\n", path_in_repo="dev.txt", repo_id=REPO, revision="dev")
    assert api.file_exists(REPO, "dev.txt", revision="dev")
    assert not api.file_exists(REPO, "dev.txt")
    assert api.model_info(REPO).sha == first.oid

    refs = api.list_repo_refs(REPO)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": first.oid, "dev": on_dev.oid}

    # Branch names with slashes are URL-quoted by the client.
    api.create_branch(REPO, branch="feature/x", revision=first.oid)
    path = hf_hub_download(REPO, "config.json", revision="feature/x", endpoint=hub_env.url, cache_dir=tmp_path)
    assert Path(path).read_bytes() == (model_folder / "config.json").read_bytes()

    api.create_tag(REPO, tag="v1", revision="dev")
    assert api.model_info(REPO, revision="v1").sha == on_dev.oid
    assert [t.name for t in api.list_repo_refs(REPO).tags] == ["v1"]
    api.delete_tag(REPO, tag="v1")

    api.delete_branch(REPO, branch="dev")
    assert not api.revision_exists(REPO, "dev")
    assert api.revision_exists(REPO, on_dev.oid)  # commits outlive their branch

    pr = api.upload_file(path_or_fileobj=b"proposal\n", path_in_repo="pr.txt", repo_id=REPO, create_pr=True)
    assert pr.pr_revision == "refs/pr/1" and pr.pr_num == 1
    assert api.file_exists(REPO, "pr.txt", revision="refs/pr/1")
    assert not api.file_exists(REPO, "pr.txt")
    assert [p.ref for p in api.list_repo_refs(REPO, include_pull_requests=True).pull_requests] == ["refs/pr/1"]


def test_safetensors_metadata_range_and_head(hub_env: HubServer, model_folder: Path) -> None:
    api = _api(hub_env)
    commit = _upload(hub_env, model_folder)
    meta = api.get_safetensors_metadata(REPO)
    tensors = meta.files_metadata["model.safetensors"].tensors
    assert tensors["weight"].shape == [4, 8] and tensors["weight"].dtype == "F32"
    assert meta.parameter_count == {"F32": 40}

    data = (model_folder / "model.safetensors").read_bytes()
    url = hf_hub_url(REPO, "model.safetensors", endpoint=hub_env.url)
    status, headers, body = _http("GET", url, {"Range": "bytes=0-7"})
    assert status == 206 and body == data[:8] and headers["Content-Range"] == f"bytes 0-7/{len(data)}"
    status, _, body = _http("GET", url, {"Range": "bytes=-10"})
    assert status == 206 and body == data[-10:]
    status, _, body = _http("GET", url, {"Range": f"bytes=5-{len(data) + 100}"})
    assert status == 206 and body == data[5:]
    status, headers, _ = _http("GET", url, {"Range": f"bytes={len(data)}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(data)}"
    status, _, body = _http("GET", url)
    assert status == 200 and body == data

    status, headers, body = _http("HEAD", url)
    sha256 = hashlib.sha256(data).hexdigest()
    assert status == 200 and body == b""
    assert headers["X-Repo-Commit"] == commit.oid
    assert headers["X-Linked-Etag"] == f'"{sha256}"' and headers["X-Linked-Size"] == str(len(data))
    assert headers["Content-Length"] == str(len(data))

    meta_lfs = get_hf_file_metadata(url, token=False)
    assert (meta_lfs.etag, meta_lfs.size, meta_lfs.commit_hash) == (sha256, len(data), commit.oid)
    config = (model_folder / "config.json").read_bytes()
    meta_reg = get_hf_file_metadata(hf_hub_url(REPO, "config.json", endpoint=hub_env.url), token=False)
    assert (meta_reg.etag, meta_reg.size) == (git_blob_sha1(config), len(config))


def test_not_found_errors(hub_env: HubServer, tmp_path: Path) -> None:
    api = _api(hub_env)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("ghost/repo")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("ghost/repo", "config.json", endpoint=hub_env.url, cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="ghost/repo")
    assert not api.repo_exists("ghost/repo")

    api.create_repo(REPO)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.bin", endpoint=hub_env.url, cache_dir=tmp_path)
    with pytest.raises(EntryNotFoundError):
        api.delete_file("missing.bin", repo_id=REPO)

    status, headers, body = _http("GET", hf_hub_url(REPO, "missing.bin", endpoint=hub_env.url))
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound" and "error" in json.loads(body)
    status, headers, _ = _http("GET", f"{hub_env.url}/api/models/ghost/repo")
    assert status == 404 and headers["X-Error-Code"] == "RepoNotFound"


def test_token_auth_and_private_repos(
    hub_server_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = hub_server_factory(token="secret-token")
    configure_hf_client(monkeypatch, server.url, tmp_path / "hf_home")  # no implicit token
    good, anon, bad = _api(server, "secret-token"), _api(server, False), _api(server, "wrong-token")

    assert good.whoami()["name"] == server.username
    with pytest.raises(HfHubHTTPError) as exc:
        bad.whoami()
    assert exc.value.response.status_code == 401

    with pytest.raises(HfHubHTTPError) as exc:
        anon.create_repo("user/public")
    assert exc.value.response.status_code == 401
    good.create_repo("user/public")
    good.create_repo("user/secret", private=True)
    good.upload_file(path_or_fileobj=b"top secret\n", path_in_repo="s.txt", repo_id="user/secret")

    assert anon.model_info("user/public").private is False
    with pytest.raises(HfHubHTTPError) as exc:
        anon.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="user/public")
    assert exc.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as exc:  # a wrong token is a plain 401, even on public repos
        bad.model_info("user/public")
    assert exc.value.response.status_code == 401 and not isinstance(exc.value, RepositoryNotFoundError)

    with pytest.raises(RepositoryNotFoundError) as exc:
        anon.model_info("user/secret")
    assert exc.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/secret", "s.txt", endpoint=server.url, cache_dir=tmp_path / "c", token=False)
    assert "user/secret" not in [m.id for m in anon.list_models(author="user")]
    assert good.model_info("user/secret").private is True
    path = hf_hub_download("user/secret", "s.txt", endpoint=server.url, cache_dir=tmp_path / "c", token="secret-token")
    assert Path(path).read_bytes() == b"top secret\n"

    good.update_repo_settings("user/secret", private=False)
    assert anon.model_info("user/secret").private is False


def test_persistence_across_restart(
    hub_server_factory: Any, model_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    first = hub_server_factory(root)
    configure_hf_client(monkeypatch, first.url, tmp_path / "hf_home")
    commit = _upload(first, model_folder)
    first_url = first.url
    first.stop()

    second = hub_server_factory(root, port=first.port)  # same root and port, like a CLI restart
    assert second.url == first_url
    api = _api(second)
    assert api.model_info(REPO).sha == commit.oid
    path = hf_hub_download(REPO, "model.safetensors", endpoint=second.url, cache_dir=tmp_path / "c")
    assert Path(path).read_bytes() == (model_folder / "model.safetensors").read_bytes()
    more = api.upload_file(path_or_fileobj=b"after restart\n", path_in_repo="later.txt", repo_id=REPO)
    assert [c.commit_id for c in api.list_repo_commits(REPO)][:2] == [more.oid, commit.oid]


def test_lfs_protocol_details(hub_env: HubServer, tmp_path: Path) -> None:
    api = _api(hub_env)
    api.create_repo(REPO)
    big = os.urandom(1_100_000)  # > 1 MB => LFS even for a .txt file
    api.upload_file(path_or_fileobj=big, path_in_repo="big.txt", repo_id=REPO)
    (entry,) = api.get_paths_info(REPO, ["big.txt"])
    assert entry.lfs is not None and entry.lfs.sha256 == hashlib.sha256(big).hexdigest()

    base = f"{hub_env.url}/api/models/{REPO}"
    body = {"files": [{"path": "w.safetensors", "size": 10, "sample": ""}, {"path": "c.json", "size": 10}]}
    json_headers = {"Content-Type": "application/json"}
    status, _, raw = _http("POST", f"{base}/preupload/main", json_headers, json.dumps(body).encode())
    assert status == 200
    modes = {f["path"]: f["uploadMode"] for f in json.loads(raw)["files"]}
    assert modes == {"w.safetensors": "lfs", "c.json": "regular"}

    payload = b"some lfs payload"
    oid = hashlib.sha256(payload).hexdigest()
    batch_req = {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": len(payload)}]}
    batch_url = f"{hub_env.url}/{REPO}.git/info/lfs/objects/batch"
    status, _, raw = _http("POST", batch_url, json_headers, json.dumps(batch_req).encode())
    (obj,) = json.loads(raw)["objects"]
    href = obj["actions"]["upload"]["href"]
    assert status == 200 and href.startswith(hub_env.url)

    assert _http("PUT", href + "0", body=payload)[0] == 403  # tampered signature
    assert _http("PUT", href, body=b"x" * len(payload))[0] == 400  # sha256 mismatch
    # Chunked transfer encoding is accepted too.
    split = urllib.parse.urlsplit(href)
    conn = http.client.HTTPConnection(split.hostname, split.port, timeout=10)
    conn.request("PUT", f"{split.path}?{split.query}", body=iter([payload[:5], payload[5:]]), encode_chunked=True)
    assert conn.getresponse().status == 200
    conn.close()
    assert (hub_env.root / "blobs" / oid).read_bytes() == payload

    status, _, raw = _http("POST", batch_url, json_headers, json.dumps(batch_req).encode())
    assert "actions" not in json.loads(raw)["objects"][0]  # already stored => client skips the upload
    verify = obj["actions"]["verify"]["href"]
    assert _http("POST", verify, json_headers, json.dumps({"oid": oid, "size": len(payload)}).encode())[0] == 200
    assert _http("POST", verify, json_headers, json.dumps({"oid": "0" * 64, "size": 1}).encode())[0] == 404


def _ndjson_commit(url: str, *ops: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    lines = [{"key": "header", "value": {"summary": "raw commit", "description": ""}}, *ops]
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    return _http("POST", url, {"Content-Type": "application/x-ndjson"}, body)


def test_request_limits_and_invalid_commits(hub_server_factory: Any) -> None:
    server = hub_server_factory(max_body_bytes=4096)
    commit_url = f"{server.url}/api/models/{REPO}/commit/main"
    assert _http("POST", f"{server.url}/api/repos/create", {}, json.dumps({"name": REPO}).encode())[0] == 200

    too_big = {"key": "file", "value": {"path": "a.txt", "content": "QUFB" * 2000, "encoding": "base64"}}
    assert _ndjson_commit(commit_url, too_big)[0] == 413
    status, headers, body = _ndjson_commit(
        commit_url, {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": "ab" * 32, "size": 3}}
    )
    assert status == 400 and "not uploaded" in json.loads(body)["error"]
    for bad_path in ("../escape.txt", "a/../../b", ".git/config", "/abs"):
        op = {"key": "file", "value": {"path": bad_path, "content": "eA==", "encoding": "base64"}}
        assert _ndjson_commit(commit_url, op)[0] == 400, bad_path
    conflict = [
        {"key": "file", "value": {"path": "x", "content": "eA==", "encoding": "base64"}},
        {"key": "file", "value": {"path": "x/y", "content": "eA==", "encoding": "base64"}},
    ]
    assert _ndjson_commit(commit_url, *conflict)[0] == 400
    ok = {"key": "file", "value": {"path": "ok.txt", "content": "eA==", "encoding": "base64"}}
    status, _, body = _ndjson_commit(commit_url, ok)
    assert status == 200 and len(json.loads(body)["commitOid"]) == 40
    assert _http("GET", f"{server.url}/api/models/..%2Fetc/passwd")[0] in (400, 404)


def test_concurrent_commits_are_serialised(hub_env: HubServer) -> None:
    api = _api(hub_env)
    api.create_repo(REPO)
    errors: list[BaseException] = []

    def commit(i: int) -> None:
        try:
            HfApi(endpoint=hub_env.url, token=False).upload_file(
                path_or_fileobj=f"file {i}\n".encode(), path_in_repo=f"f{i}.txt", repo_id=REPO
            )
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert {f"f{i}.txt" for i in range(6)} <= set(api.list_repo_files(REPO))
    assert len(api.list_repo_commits(REPO)) == 7


def test_loopback_only_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert is_loopback_host("127.0.0.1") and is_loopback_host("::1") and is_loopback_host("localhost")
    assert not is_loopback_host("0.0.0.0") and not is_loopback_host("example.com")
    with pytest.raises(ValueError):
        HubServer(tmp_path / "r", host="0.0.0.0")
    assert main(["--host", "0.0.0.0", "--root", str(tmp_path / "r")]) == 2
    assert "refusing" in capsys.readouterr().err

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "deltahub.testing.hub_server", "--root", str(tmp_path / "cli"), "--token", "t0k"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert "running at http://127.0.0.1:" in line, line + (proc.stderr.read() if proc.stderr else "")
        url = line.split("running at ", 1)[1].split()[0]
        status, _, body = _http("GET", f"{url}/api/whoami-v2", {"Authorization": "Bearer t0k"})
        assert status == 200 and json.loads(body)["name"] == "user"
        create = _http("POST", f"{url}/api/repos/create", {"Content-Type": "application/json"}, b'{"name": "x"}')
        assert create[0] == 401
    finally:
        proc.send_signal(signal.SIGINT)
        try:  # communicate drains both pipes while waiting (a full pipe would block the server's exit)
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            raise AssertionError(f"the server did not exit within 30 s of SIGINT; stderr: {err[-2000:]}") from None
        assert proc.returncode == 0, err[-2000:]


def test_bandwidth_limit_is_one_shared_link(hub_server_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``bandwidth=4`` MB/s: one 2 MB download takes >= 0.5 s, two concurrent ones share the link (>= 1 s together)."""
    server = hub_server_factory(bandwidth=4)
    configure_hf_client(monkeypatch, server.url, tmp_path / "hf_home")
    assert "bandwidth=4 MB/s" in repr(server)
    api = HfApi(endpoint=server.url, token=False)
    api.create_repo(REPO)
    size = 2_000_000
    blobs = {name: os.urandom(size) for name in ("a.bin", "b.bin", "c.bin")}
    for name, data in blobs.items():
        api.upload_file(path_or_fileobj=data, path_in_repo=name, repo_id=REPO)

    def fetch(name: str, cache: str) -> None:
        path = hf_hub_download(REPO, name, endpoint=server.url, cache_dir=tmp_path / cache, token=False)
        assert Path(path).read_bytes() == blobs[name]

    t0 = time.perf_counter()
    fetch("a.bin", "c1")
    single = time.perf_counter() - t0
    threads = [threading.Thread(target=fetch, args=(name, "c2")) for name in ("b.bin", "c.bin")]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pair = time.perf_counter() - t0
    burst = server.bandwidth_bucket.burst / 4e6  # the bucket may start full: one piece early
    assert single >= size / 4e6 - burst - 0.01, single
    assert pair >= 2 * size / 4e6 - burst - 0.01, pair  # a per-connection limit would take ~0.5 s
    assert single < 10 and pair < 20  # paced, not stalled

    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="bandwidth"):
            HubServer(tmp_path / "r", bandwidth=bad)
    with pytest.raises(SystemExit):
        main(["--root", str(tmp_path / "r"), "--bandwidth", "0"])
