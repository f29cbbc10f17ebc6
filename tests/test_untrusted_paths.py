"""Names from an untrusted delta, index or Hub listing never reach outside their directory.

Each test reproduces one finding of the "untrusted deltas" issue: the manifest's ``files`` used
as copy source and destination (``../.bashrc``, ``model.safetensors``, ``/etc/hostname``,
symlinks), push uploading what ``files`` names, ``info`` putting names into Hub URLs, delta and
base indexes pointing out of their folder, a downloaded delta naming a local base folder, and
``../`` names in a repo listing. Every one must end in a one-line :class:`UnsafePathError`
with nothing written outside the output (and nothing uploaded).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import HfApi
from typer.testing import CliRunner

from conftest import make_tiny_pair
from deltahub.cli import app
from deltahub.compression import compress
from deltahub.delta import Delta, apply_delta
from deltahub.errors import DeltaHubError, UnsafePathError
from deltahub.format.integrity import file_digest, manifest_bytes
from deltahub.format.io import Checkpoint
from deltahub.format.names import check_listed_file, check_name, member
from deltahub.hub import pull, push_to_hub, remote_info
from deltahub.testing.fixtures import hub_env, hub_server, hub_server_factory  # noqa: F401
from deltahub.testing.hub_server import HubServer

runner = CliRunner()


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("made")
    base, ft = make_tiny_pair(root)
    (ft / "tokenizer.json").write_text('{"version": "1.0"}')
    compress(base, ft, root / "delta", codec="bitdelta", progress=False)
    sharded = root / "sharded"
    compress(base, ft, sharded, codec="bitdelta", progress=False, max_shard_size=4000)
    return {"root": root, "base": base, "ft": ft, "delta": root / "delta", "sharded": sharded}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _reseal(d: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit the manifest and re-seal it (fresh file digests, manifest digest): a *consistent* hostile delta,
    so the name rules are what is tested, not the digests."""
    p = d / "delta_config.json"
    m = json.loads(p.read_text())
    edit(m)
    m["file_digests"] = {f: file_digest(d / f) for f in m["file_digests"] if (d / f).is_file() and not (d / f).is_symlink()}
    p.write_bytes(manifest_bytes(m))


def _as_v10(d: Path) -> None:
    """Strip the 1.1 digests: a 1.0 delta, readable but with nothing to verify."""
    p = d / "delta_config.json"
    m = json.loads(p.read_text())
    m["format_version"] = "1.0"
    for key in ("file_digests", "manifest_digest"):
        m.pop(key, None)
    for e in m["tensors"].values():
        e.pop("digests", None)
    p.write_text(json.dumps(m))


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text.strip()
    return text


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


# --------------------------------------------------------------------------------------------- the rule


@pytest.mark.parametrize("name", ["../.bashrc", "/etc/hostname", "a/b", "..", ".", "", ".hidden", "C:evil", "x\\y", "a\x00b",
                                  "a\nb", "x" * 300, 5, None])
def test_check_name_refuses_paths(name: Any) -> None:
    with pytest.raises(UnsafePathError):
        check_name(name, what="test")


@pytest.mark.parametrize("name", ["model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
                                  "config.json", "delta_config.json", "pytorch_model.bin", "modeling_evil.py", "weights.gguf",
                                  "x.safetensors", "CONFIG.JSON"])
def test_aux_names_that_would_replace_weights_config_or_code_are_refused(name: str) -> None:
    with pytest.raises(UnsafePathError, match="may not carry"):
        check_listed_file(name)


@pytest.mark.parametrize("name", ["delta.safetensors", "delta-00001-of-00003.safetensors", "delta.safetensors.index.json",
                                  "tokenizer.json", "generation_config.json", "chat_template.jinja", "tokenizer.model"])
def test_ordinary_names_pass(name: str) -> None:
    assert check_listed_file(name) == name


def test_member_follows_links_only_inside_the_root(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "real.json").write_text("{}")
    (tmp_path / "secret").write_text("s3cret")
    (d / "inside.json").symlink_to("real.json")
    (d / "outside.json").symlink_to(tmp_path / "secret")
    (d / "sub").mkdir()
    assert member(d, "inside.json", what="t") == d / "inside.json"
    with pytest.raises(UnsafePathError, match="symbolic link out"):
        member(d, "outside.json", what="t")
    with pytest.raises(UnsafePathError, match="not a regular file"):
        member(d, "sub", what="t")
    # A Hub cache snapshot: files are links to ../../blobs/<hash> inside the repo's cache folder.
    snap = tmp_path / "hub" / "models--ns--name" / "snapshots" / ("a" * 40)
    blobs = tmp_path / "hub" / "models--ns--name" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    (blobs / "abc").write_text("{}")
    (snap / "tokenizer.json").symlink_to("../../blobs/abc")
    (snap / "evil.json").symlink_to(tmp_path / "secret")
    assert member(snap, "tokenizer.json", what="t") == snap / "tokenizer.json"
    with pytest.raises(UnsafePathError):
        member(snap, "evil.json", what="t")


# --------------------------------------------------------------------------------------------- apply


def test_files_entry_escaping_the_delta_cannot_overwrite_next_to_the_output(made: dict[str, Path], tmp_path: Path) -> None:
    d = _copy(made["delta"], tmp_path / "d")
    (d / ".bashrc").write_text("evil")
    (tmp_path / ".bashrc").write_text("mine")
    _reseal(d, lambda m: m["files"].append("../.bashrc"))
    before = _tree(tmp_path)
    with pytest.raises(UnsafePathError, match=r"\.\./\.bashrc") as ei:
        apply_delta(d, made["base"], tmp_path / "out")
    _one_line(ei.value)
    assert (tmp_path / ".bashrc").read_text() == "mine"
    assert not (tmp_path / "out").exists() and _tree(tmp_path) == before


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_files_entry_cannot_replace_the_rebuilt_weights_or_config(made: dict[str, Path], tmp_path: Path, name: str) -> None:
    d = _copy(made["delta"], tmp_path / "d")
    (d / name).write_bytes(b"junk")
    _reseal(d, lambda m: m["files"].append(name))
    r = runner.invoke(app, ["apply", str(d), "--base", str(made["base"]), "-o", str(tmp_path / "out"), "-q"])
    assert r.exit_code == 1 and "Traceback" not in r.output and name in r.output
    assert not (tmp_path / "out").exists()


def test_absolute_files_entry_is_one_typed_line(made: dict[str, Path], tmp_path: Path) -> None:
    d = _copy(made["delta"], tmp_path / "d")
    _reseal(d, lambda m: m["files"].append("/etc/hostname"))
    r = runner.invoke(app, ["apply", str(d), "--base", str(made["base"]), "-o", str(tmp_path / "out"), "-q"])
    assert r.exit_code == 1 and "Traceback" not in r.output and "/etc/hostname" in r.output
    assert len([ln for ln in r.output.splitlines() if ln.strip()]) == 1
    assert not (tmp_path / "out").exists()


def test_symlinked_aux_file_is_not_followed_out_of_the_delta(made: dict[str, Path], tmp_path: Path) -> None:
    d = _copy(made["delta"], tmp_path / "d")
    (tmp_path / "secret").write_text("s3cret")
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.json").symlink_to(tmp_path / "secret")
    for v10 in (False, True):  # with digests (1.1) or none to check (1.0), the link is refused before it is read
        if v10:
            _as_v10(d)
        with pytest.raises(UnsafePathError, match="symbolic link out") as ei:
            apply_delta(d, made["base"], tmp_path / "out")
        _one_line(ei.value)
        assert not (tmp_path / "out").exists()


def test_symlink_inside_the_delta_is_fine(made: dict[str, Path], tmp_path: Path) -> None:
    d = _copy(made["delta"], tmp_path / "d")
    (d / "tokenizer.json").rename(d / "tok-real.json")
    (d / "tokenizer.json").symlink_to("tok-real.json")
    out = apply_delta(d, made["base"], tmp_path / "out")
    assert not (out / "tokenizer.json").is_symlink()
    assert (out / "tokenizer.json").read_bytes() == (made["ft"] / "tokenizer.json").read_bytes()


# --------------------------------------------------------------------------------------------- indexes


def test_delta_index_pointing_out_of_the_delta_is_refused(made: dict[str, Path], tmp_path: Path) -> None:
    d = _copy(made["sharded"], tmp_path / "d")
    shutil.copy(d / "delta-00001-of-00002.safetensors" if (d / "delta-00001-of-00002.safetensors").exists()
                else next(d.glob("delta-*.safetensors")), tmp_path / "x.safetensors")
    index = json.loads((d / "delta.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../x.safetensors"
    (d / "delta.safetensors.index.json").write_text(json.dumps(index))
    _reseal(d, lambda m: None)
    with pytest.raises(UnsafePathError, match=r"\.\./x\.safetensors") as ei:
        Delta(d)
    _one_line(ei.value)


@pytest.mark.parametrize("target", ["../x.safetensors", "/tmp/x.safetensors", "sub/x.safetensors"])
def test_base_index_pointing_out_of_the_base_is_refused(made: dict[str, Path], tmp_path: Path, target: str) -> None:
    base = _copy(made["base"], tmp_path / "base")
    (base / "model.safetensors").rename(tmp_path / "x.safetensors")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": target}}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafePathError) as ei:
        Checkpoint(base)
    _one_line(ei.value)
    with pytest.raises(DeltaHubError):
        apply_delta(made["delta"], base, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- Hub


def _api(server: HubServer) -> HfApi:
    return HfApi(endpoint=server.url, token=False)


def test_push_uploads_nothing_outside_the_delta(hub_env: HubServer, made: dict[str, Path], tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    d = _copy(made["delta"], tmp_path / "d")
    _reseal(d, lambda m: m["files"].append(str(secret)))
    with pytest.raises(UnsafePathError):
        push_to_hub(d, "me/leak")
    d2 = _copy(made["delta"], tmp_path / "d2")
    (d2 / "tokenizer.json").unlink()
    (d2 / "tokenizer.json").symlink_to(secret)
    r = runner.invoke(app, ["push", str(d2), "me/leak2"])
    assert r.exit_code == 1 and "Traceback" not in r.output and "symbolic link" in r.output
    listed = [m.id for m in _api(hub_env).list_models()]
    assert "me/leak" not in listed and "me/leak2" not in listed


def test_info_never_puts_manifest_names_into_urls(hub_env: HubServer, made: dict[str, Path], tmp_path: Path) -> None:
    api = _api(hub_env)
    d = _copy(made["delta"], tmp_path / "d")
    _reseal(d, lambda m: m["files"].append("../../../other-private-repo/resolve/main/delta.safetensors"))
    api.create_repo("me/public")
    api.upload_folder(folder_path=d, repo_id="me/public")
    with pytest.raises(UnsafePathError):
        remote_info("me/public")
    r = runner.invoke(app, ["info", "me/public"])
    assert r.exit_code == 1 and "Traceback" not in r.output


def test_pull_never_uses_a_local_base_named_by_the_delta(hub_env: HubServer, made: dict[str, Path], tmp_path: Path) -> None:
    api = _api(hub_env)
    d = _copy(made["delta"], tmp_path / "d")
    assert Path(json.loads((d / "delta_config.json").read_text())["base"]["name_or_path"]).is_absolute()
    api.create_repo("me/localbase")
    api.upload_folder(folder_path=d, repo_id="me/localbase")
    with pytest.raises(UnsafePathError, match="--base") as ei:
        pull("me/localbase", tmp_path / "out")
    _one_line(ei.value)
    assert not (tmp_path / "out").exists()
    out = pull("me/localbase", tmp_path / "out2", base_model=str(made["base"]))  # explicit: the user's choice
    assert (out / "model.safetensors").is_file()


def test_traversal_names_in_a_repo_listing_are_typed(hub_env: HubServer, made: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub refuses '../' names with a ValueError; deltahub reports it as one typed line."""
    import deltahub.hub._download as hub  # where snapshot_download is looked up
    from huggingface_hub import hf_hub_download

    api = _api(hub_env)
    api.create_repo("me/listing")
    api.upload_folder(folder_path=made["delta"], repo_id="me/listing")

    def listing_with_traversal(repo_id: str, **kw: Any) -> str:
        return hf_hub_download(repo_id, "../../evil.json", revision=kw.get("revision"), cache_dir=kw.get("cache_dir"),
                               endpoint=kw.get("endpoint"), token=kw.get("token"))

    monkeypatch.setattr(hub, "snapshot_download", listing_with_traversal)
    r = runner.invoke(app, ["pull", "me/listing", "-o", str(tmp_path / "out"), "--base", str(made["base"])])
    assert r.exit_code == 1 and "Traceback" not in r.output and "leave the download folder" in r.output
    assert not (tmp_path / "out").exists()


def test_base_index_may_only_name_safetensors_shards(made: dict[str, Path], tmp_path: Path) -> None:
    base = _copy(made["base"], tmp_path / "base")
    (base / "x.bin").write_bytes(b"pickle")
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.embed_tokens.weight": "x.bin"}}))
    with pytest.raises(UnsafePathError, match="x.bin"):
        Checkpoint(base)


def test_compress_leaves_out_a_finetune_file_linked_out_of_its_folder(made: dict[str, Path], tmp_path: Path) -> None:
    """A stranger's checkpoint whose tokenizer.json links to a secret: the secret never reaches the delta (or the Hub)."""
    ft = _copy(made["ft"], tmp_path / "ft")
    secret = tmp_path / "secret"
    secret.write_bytes(b"s3cret")
    (ft / "tokenizer.json").unlink()
    (ft / "tokenizer.json").symlink_to(secret)
    (ft / "tokenizer_config.json").symlink_to("generation_config.json")  # a link inside the folder is fine
    with pytest.warns(UserWarning, match="symbolic link out"):
        m = compress(made["base"], ft, tmp_path / "d", codec="bitdelta", progress=False)
    assert "tokenizer.json" not in m.files and "tokenizer_config.json" in m.files
    assert not any(b"s3cret" in p.read_bytes() for p in (tmp_path / "d").iterdir())
