"""Hub integration end to end: the real ``huggingface_hub`` client against the local Hub server.

push -> pull into a fresh cache rebuilds the fine-tune bit for bit; the base stays pinned to
the commit it was compressed against; every failure (wrong / missing base, missing repo, bad
token, interrupted download, offline cache miss) is a typed error and leaves no output.
"""

from __future__ import annotations

import json
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants, hf_hub_download
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import make_tiny_pair
from deltahub import AutoDeltaModel, Delta
from deltahub.cli import app
from deltahub.compression import compress
from deltahub.delta import apply_delta
from deltahub.errors import (
    AuthenticationError,
    BaseMismatchError,
    DownloadError,
    HubError,
    OutputExistsError,
    RemoteFileNotFoundError,
    RepoNotFoundError,
    RevisionNotFoundError,
)
from deltahub.format.spec import MANIFEST_NAME
from deltahub.hub import is_hub_spec, model_card, parse_model_spec, pull, pull_model, push_to_hub, remote_info
from deltahub.testing.fixtures import configure_hf_client, hub_env, hub_server, hub_server_factory  # noqa: F401
from deltahub.testing.hub_server import HubServer, _HubRequestHandler

BASE, FT, DELTA = "org/base", "org/ft", "me/delta"
runner = CliRunner()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny (base, fine-tune) pair and an unrelated base, made once for the module."""
    root = tmp_path_factory.mktemp("pairs")
    base, ft = make_tiny_pair(root / "a")
    other, _ = make_tiny_pair(root / "b", seed=7)
    return {"base": base, "ft": ft, "other": other}


def _api(server: HubServer, token: str | bool | None = False) -> HfApi:
    return HfApi(endpoint=server.url, token=token)


def _upload(server: HubServer, folder: Path, repo_id: str, token: str | bool | None = False) -> str:
    api = _api(server, token)
    api.create_repo(repo_id, exist_ok=True)
    return api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message=f"add {repo_id}").oid


def _publish(server: HubServer, pairs: dict[str, Path], tmp: Path, token: str | bool | None = False) -> dict[str, Any]:
    """Upload base and fine-tune, compress from their Hub ids, push the delta; returns the shas and paths."""
    base_sha = _upload(server, pairs["base"], BASE, token)
    ft_sha = _upload(server, pairs["ft"], FT, token)
    manifest = compress(BASE, FT, tmp / "delta", params={"granularity": "row"}, codec="bitdelta", progress=False,
                        token=token, cache_dir=tmp / "compress_cache", endpoint=server.url)
    commit = push_to_hub(tmp / "delta", DELTA, token=token, endpoint=server.url)
    return {"base_sha": base_sha, "ft_sha": ft_sha, "manifest": manifest, "commit": commit}


def _bytes(model_dir: Path) -> bytes:
    return (model_dir / "model.safetensors").read_bytes()


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


# ------------------------------------------------------------------------------------- unit


def test_model_specs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_model_spec("user/model") == ("user/model", None)
    assert parse_model_spec("user/model@v1.0") == ("user/model", "v1.0")
    assert parse_model_spec("user/model@refs/pr/1") == ("user/model", "refs/pr/1")
    for bad in ("model", "a/b/c", "user/mo--del", "user/model@", "/abs/path", "./x/y"):
        with pytest.raises(HubError):
            parse_model_spec(bad)
    monkeypatch.chdir(tmp_path)
    assert is_hub_spec("user/model@abc")
    (tmp_path / "user" / "model").mkdir(parents=True)
    assert not is_hub_spec("user/model")  # an existing local path always wins
    assert not is_hub_spec(Path("other/model"))


def test_model_card_has_yaml_and_table(pairs: dict[str, Path], tmp_path: Path) -> None:
    m = compress(pairs["base"], pairs["ft"], tmp_path / "d", codec="bitdelta", progress=False, base_name_or_path=BASE, base_revision="a" * 40)
    card = model_card(m, DELTA)
    data = ModelCard(card).data
    body = ModelCard(card).text
    assert data.base_model == "org/base" and data.library_name == "deltahub" and data.base_model_relation == "finetune"
    assert data.pipeline_tag == "text-generation" and {"deltahub", "bitdelta", "raw"} <= set(data.tags)
    assert "| codec | tensors | parameters | stored | bits/weight | vs fp16 |" in body
    assert "| bitdelta |" in body and "**total**" in body
    assert f"deltahub pull {DELTA} -o ./model" in body and f'AutoDeltaModel.from_pretrained("{DELTA}")' in body
    assert "a" * 40 in body and m.base.fingerprint in body
    local = model_card(compress(pairs["base"], pairs["ft"], tmp_path / "d2", codec="bitdelta", progress=False))
    assert "base_model:" not in local  # a local base is not a Hub repo id


# ------------------------------------------------------------------------------------- end to end


def test_push_pull_roundtrip_is_bit_exact_and_base_stays_pinned(hub_env: HubServer, pairs: dict[str, Path], tmp_path: Path) -> None:
    pub = _publish(hub_env, pairs, tmp_path)
    m = pub["manifest"]
    assert (m.base.name_or_path, m.base.revision) == (BASE, pub["base_sha"])
    assert m.finetuned == {"name_or_path": FT, "revision": pub["ft_sha"]}

    api = _api(hub_env)
    files = set(api.list_repo_files(DELTA))
    assert {MANIFEST_NAME, "delta.safetensors", "README.md"} <= files
    # The fine-tune's generation config equals the base's: taken from the (pinned) base, not uploaded.
    assert "generation_config.json" not in files and set(m.base_files) == {"generation_config.json"}
    assert len(api.list_repo_commits(DELTA)) == 2  # initial commit + exactly one push commit
    card = Path(hf_hub_download(DELTA, "README.md", endpoint=hub_env.url, cache_dir=tmp_path / "c0")).read_text()
    assert ModelCard(card).data.base_model == "org/base" and "| **total** |" in card

    apply_delta(tmp_path / "delta", pairs["base"], tmp_path / "local", progress=False)
    out = pull(DELTA, tmp_path / "pulled", cache_dir=tmp_path / "cache1", endpoint=hub_env.url)
    assert _bytes(out) == _bytes(tmp_path / "local")
    assert json.loads((out / "config.json").read_text()) == m.config
    assert (out / "generation_config.json").read_bytes() == (pairs["ft"] / "generation_config.json").read_bytes()

    # The base repo moves on; a pull into a fresh cache still rebuilds against the pinned commit.
    moved = {k: v + 1 for k, v in load_file(str(pairs["base"] / "model.safetensors")).items()}
    save_file(moved, str(tmp_path / "model.safetensors"), {"format": "pt"})
    new_sha = api.upload_file(path_or_fileobj=str(tmp_path / "model.safetensors"), path_in_repo="model.safetensors", repo_id=BASE).oid
    assert new_sha != pub["base_sha"] and api.model_info(BASE).sha == new_sha
    result = pull_model(DELTA, tmp_path / "pulled2", cache_dir=tmp_path / "cache2", endpoint=hub_env.url)
    assert result.base.commit_sha == pub["base_sha"] and _bytes(result.output_dir) == _bytes(tmp_path / "local")
    snapshots = {p.name for p in (tmp_path / "cache2" / "models--org--base" / "snapshots").iterdir()}
    assert snapshots == {pub["base_sha"]}  # main was never fetched

    # Asking for the moved base explicitly is refused, naming both bases; nothing is written.
    with pytest.raises(BaseMismatchError) as exc:
        pull(DELTA, tmp_path / "bad", base_revision=new_sha, cache_dir=tmp_path / "cache2", endpoint=hub_env.url)
    assert f"{BASE}@{new_sha}" in str(exc.value) and f"{BASE}@{pub['base_sha']}" in str(exc.value)
    assert not (tmp_path / "bad").exists() and not _leftovers(tmp_path)

    with pytest.raises(OutputExistsError):
        pull(DELTA, out, endpoint=hub_env.url)


def test_wrong_and_missing_base_and_missing_repo(hub_env: HubServer, pairs: dict[str, Path], tmp_path: Path) -> None:
    _publish(hub_env, pairs, tmp_path)
    _upload(hub_env, pairs["other"], "org/other")
    with pytest.raises(BaseMismatchError) as exc:
        pull(DELTA, tmp_path / "o1", base_model="org/other", cache_dir=tmp_path / "c", endpoint=hub_env.url)
    assert "org/other@" in str(exc.value) and f"{BASE}@" in str(exc.value)
    with pytest.raises(BaseMismatchError):  # a local wrong base too
        pull(DELTA, tmp_path / "o1", base_model=pairs["other"], cache_dir=tmp_path / "c", endpoint=hub_env.url)

    _api(hub_env).delete_repo(BASE)
    with pytest.raises(RepoNotFoundError, match="org/base"):
        pull(DELTA, tmp_path / "o2", cache_dir=tmp_path / "fresh", endpoint=hub_env.url)
    with pytest.raises(RepoNotFoundError, match="me/ghost"):
        pull("me/ghost", tmp_path / "o3", cache_dir=tmp_path / "c", endpoint=hub_env.url)
    with pytest.raises(RevisionNotFoundError, match="nope"):
        pull(DELTA, tmp_path / "o4", revision="nope", cache_dir=tmp_path / "c", endpoint=hub_env.url)
    with pytest.raises(RemoteFileNotFoundError, match="delta_config.json"):
        pull("org/other", tmp_path / "o5", cache_dir=tmp_path / "c", endpoint=hub_env.url)  # a model, not a delta
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6)) and not _leftovers(tmp_path)

    r = runner.invoke(app, ["pull", "me/ghost", "-o", str(tmp_path / "o6"), "--endpoint", hub_env.url, "-q"])
    assert r.exit_code == 1 and "me/ghost" in r.output and "not found" in r.output and "Traceback" not in r.output


def test_token_protected_server(hub_server_factory: Callable[..., HubServer], pairs: dict[str, Path], tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    server = hub_server_factory(token="s3cret")
    configure_hf_client(monkeypatch, server.url, tmp_path / "hf_home")  # no implicit token
    _upload(server, pairs["base"], BASE, token="s3cret")
    compress(BASE, pairs["ft"], tmp_path / "delta", codec="bitdelta", progress=False, token="s3cret", cache_dir=tmp_path / "c", endpoint=server.url)

    with pytest.raises(AuthenticationError, match="HTTP 401"):
        push_to_hub(tmp_path / "delta", DELTA, endpoint=server.url)
    with pytest.raises(AuthenticationError, match="HTTP 401"):
        push_to_hub(tmp_path / "delta", DELTA, endpoint=server.url, token="wrong")
    r = runner.invoke(app, ["push", str(tmp_path / "delta"), DELTA, "--endpoint", server.url])
    assert r.exit_code == 1 and "refused" in r.output

    monkeypatch.setenv("HF_TOKEN", "s3cret")  # honoured like huggingface_hub does
    r = runner.invoke(app, ["push", str(tmp_path / "delta"), DELTA, "--endpoint", server.url, "--private"])
    assert r.exit_code == 0, r.output
    assert _api(server, "s3cret").model_info(DELTA).private
    monkeypatch.delenv("HF_TOKEN")

    with pytest.raises(RepoNotFoundError, match="private"):  # a private repo without token looks missing
        pull(DELTA, tmp_path / "o", cache_dir=tmp_path / "c2", endpoint=server.url, token=False)
    with pytest.raises(AuthenticationError):
        pull(DELTA, tmp_path / "o", cache_dir=tmp_path / "c2", endpoint=server.url, token="wrong")
    assert not (tmp_path / "o").exists()
    out = pull(DELTA, tmp_path / "o", cache_dir=tmp_path / "c2", endpoint=server.url, token="s3cret")
    assert (out / "model.safetensors").is_file()


class _Truncated:
    """A write stream that lets ``budget`` bytes through, then drops the connection."""

    def __init__(self, raw: Any, budget: int) -> None:
        self.raw, self.budget = raw, budget

    def write(self, data: bytes) -> int:
        if len(data) > self.budget:
            self.raw.write(data[: self.budget])
            self.raw.flush()
            raise ConnectionResetError("simulated network cut")
        self.budget -= len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


def test_interrupted_download_leaves_nothing(hub_env: HubServer, pairs: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _publish(hub_env, pairs, tmp_path)
    original = _HubRequestHandler._resolve
    calls: list[str] = []

    def cut(self: Any, key: Any, revision: str, path: str, *, head_only: bool) -> None:
        if head_only or key.id != BASE or not path.endswith(".safetensors"):
            return original(self, key, revision, path, head_only=head_only)
        calls.append(path)
        raw, end_headers = self.wfile, self.end_headers

        def truncate_after_headers() -> None:
            end_headers()
            self.wfile = _Truncated(raw, 1000 if len(calls) == 1 else 0)  # some bytes first, then nothing

        self.end_headers = truncate_after_headers
        try:
            return original(self, key, revision, path, head_only=head_only)
        finally:
            self.wfile = raw

    monkeypatch.setattr(_HubRequestHandler, "_resolve", cut)
    import huggingface_hub.file_download as fd

    fast_time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fast_time.sleep = lambda seconds: None  # skip the client's 1 s resume back-off
    monkeypatch.setattr(fd, "time", fast_time)
    with pytest.raises(DownloadError, match="org/base") as exc:
        pull(DELTA, tmp_path / "out", cache_dir=tmp_path / "c", endpoint=hub_env.url)
    assert len(calls) > 1  # the client tried to resume
    assert "interrupted" in str(exc.value) or "did not complete" in str(exc.value)
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)

    monkeypatch.setattr(_HubRequestHandler, "_resolve", original)  # network back: the same pull completes
    assert (pull(DELTA, tmp_path / "out", cache_dir=tmp_path / "c", endpoint=hub_env.url) / "model.safetensors").is_file()


def test_pull_downloads_delta_and_sharded_base_concurrently(hub_env: HubServer, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A base in 2+ shards (not cached) and a delta: every file fetched, base and delta downloads
    overlap in time, and the rebuild is bit-exact vs a local apply."""
    base, ft = make_tiny_pair(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list(base.glob("model-*.safetensors"))) >= 2
    _upload(hub_env, base, BASE)
    compress(BASE, ft, tmp_path / "delta", params={"granularity": "row"}, codec="bitdelta", progress=False, cache_dir=tmp_path / "compress_cache", endpoint=hub_env.url)
    delta_files = [p.name for p in (tmp_path / "delta").glob("delta*.safetensors")]
    push_to_hub(tmp_path / "delta", DELTA, endpoint=hub_env.url)

    original = _HubRequestHandler._resolve
    spans: list[tuple[str, str, float, float]] = []
    delay = {"s": 0.3}

    def slow(self: Any, key: Any, revision: str, path: str, *, head_only: bool) -> None:
        t0 = time.perf_counter()
        if not head_only and path.endswith(".safetensors"):
            time.sleep(delay["s"])  # a slow link: sequential downloads could not overlap
        original(self, key, revision, path, head_only=head_only)
        if not head_only:
            spans.append((key.id, path, t0, time.perf_counter()))

    monkeypatch.setattr(_HubRequestHandler, "_resolve", slow)
    result = pull_model(DELTA, tmp_path / "pulled", cache_dir=tmp_path / "fresh", endpoint=hub_env.url)
    fetched = {(repo, path) for repo, path, _, _ in spans}
    base_shards = {p.name for p in base.glob("model-*.safetensors")}
    assert {(BASE, n) for n in base_shards} | {(DELTA, n) for n in delta_files} <= fetched
    overlap = [(d, b) for d in spans if d[0] == DELTA and d[1] in delta_files
               for b in spans if b[0] == BASE and b[1] in base_shards and b[2] < d[3] and d[2] < b[3]]
    assert overlap, spans
    local = apply_delta(tmp_path / "delta", base, tmp_path / "local", progress=False)
    assert load_file(str(local / "model.safetensors")).keys() == load_file(str(result.output_dir / "model.safetensors")).keys()
    assert _bytes(result.output_dir) == _bytes(local)

    # A delta error does not wait for the (slow) base download going on beside it.
    _api(hub_env).create_repo("me/broken")
    _api(hub_env).upload_folder(folder_path=tmp_path / "delta", repo_id="me/broken", ignore_patterns=["delta*.safetensors"])
    delay["s"] = 5.0
    t0 = time.perf_counter()
    with pytest.raises(RemoteFileNotFoundError, match="missing from the repo"):
        pull("me/broken", tmp_path / "broken", cache_dir=tmp_path / "fresh2", endpoint=hub_env.url)
    assert time.perf_counter() - t0 < 4 and not (tmp_path / "broken").exists()


def test_auto_delta_model_offline_after_one_pull(hub_env: HubServer, pairs: dict[str, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _publish(hub_env, pairs, tmp_path)
    expected = load_file(str(apply_delta(tmp_path / "delta", pairs["base"], tmp_path / "local", progress=False) / "model.safetensors"))
    model = AutoDeltaModel.from_pretrained(DELTA, endpoint=hub_env.url)  # default cache = the hub_env cache
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in expected.items())
    half = AutoDeltaModel.from_pretrained(DELTA, endpoint=hub_env.url, torch_dtype=torch.float16)
    assert next(half.parameters()).dtype == torch.float16

    hub_env.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    again = AutoDeltaModel.from_pretrained(DELTA)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in expected.items())
    assert Delta.from_pretrained(DELTA).manifest.base.name_or_path == BASE
    with pytest.raises(DownloadError, match="offline"):
        AutoDeltaModel.from_pretrained("me/never-pulled")


def test_info_reads_headers_only_and_cli_push_pull_branch(hub_env: HubServer, pairs: dict[str, Path], tmp_path: Path) -> None:
    _upload(hub_env, pairs["base"], BASE)
    r = runner.invoke(app, ["compress", f"{BASE}@main", str(pairs["ft"]), "-o", str(tmp_path / "delta"), "-q",
                            "--endpoint", hub_env.url, "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["push", str(tmp_path / "delta"), DELTA, "--revision", "dev", "-m", "first delta"])
    assert r.exit_code == 0, r.output
    assert [c.title for c in _api(hub_env).list_repo_commits(DELTA, revision="dev")][0] == "first delta"
    assert MANIFEST_NAME not in _api(hub_env).list_repo_files(DELTA)  # main untouched

    r = runner.invoke(app, ["info", DELTA, "--revision", "dev"])
    assert r.exit_code == 0, r.output
    assert "bitdelta" in r.output and "total" in r.output and "delta.safetensors" in r.output and BASE in r.output
    cache = Path(constants.HF_HUB_CACHE)
    assert list(cache.rglob("delta_config.json")) and not list(cache.rglob("*.safetensors"))  # no weights fetched
    manifest, headers = remote_info(f"{DELTA}@dev")
    assert [name for name, _ in headers] == ["delta.safetensors"]
    assert sum(t.data_offsets[1] - t.data_offsets[0] for t in headers[0][1].tensors.values()) == manifest.totals["stored_bytes"]
    r = runner.invoke(app, ["info", DELTA, "--revision", "dev", "--json"])
    assert json.loads(r.output)["files"][0]["file"] == "delta.safetensors"
    r = runner.invoke(app, ["info", "me/ghost"])
    assert r.exit_code == 1 and "not found" in r.output

    r = runner.invoke(app, ["pull", DELTA, "--revision", "dev", "-o", str(tmp_path / "out"), "-q"])
    assert r.exit_code == 0, r.output
    apply_delta(tmp_path / "delta", pairs["base"], tmp_path / "local", progress=False)
    assert _bytes(tmp_path / "out") == _bytes(tmp_path / "local")
    # --dtype as apply's: the pulled weights equal a local apply in that dtype.
    r = runner.invoke(app, ["pull", DELTA, "--revision", "dev", "-o", str(tmp_path / "out16"), "-q", "--dtype", "bfloat16"])
    assert r.exit_code == 0, r.output
    apply_delta(tmp_path / "delta", pairs["base"], tmp_path / "local16", progress=False, dtype="bfloat16")
    assert _bytes(tmp_path / "out16") == _bytes(tmp_path / "local16") != _bytes(tmp_path / "local")
    assert Delta.from_pretrained(DELTA, revision="dev").push_to_hub(DELTA).commit_url.startswith(hub_env.url)
