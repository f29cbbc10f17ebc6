"""Hugging Face conventions of the public API: one lazy top-level namespace, transformers' argument
names and dtype semantics, huggingface_hub's error names / OSError base / attributes, private=None,
a ModelCard-built card, and no import cycle between delta.py and the hub package."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_tiny_pair
from huggingface_hub import HfApi, ModelCard, hf_hub_download

import deltahub
from deltahub import AutoDeltaModel, Delta
from deltahub.compression import compress
from deltahub.testing.fixtures import (  # noqa: F401
    configure_hf_client,
    hub_env,
    hub_server,
    hub_server_factory,
)
from deltahub.testing.hub_server import HubServer

ROOT = Path(__file__).resolve().parents[1]
BASE, FT, DELTA = "org/base", "org/ft", "me/delta"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("api")
    base, ft = make_tiny_pair(root)
    compress(base, ft, root / "delta", params={"granularity": "row"}, codec="bitdelta", progress=False)
    return {"base": base, "ft": ft, "delta": root / "delta"}


def _publish(server: HubServer, made: dict[str, Path], tmp: Path, **push: Any) -> None:
    api = HfApi(endpoint=server.url, token=server.token)
    for repo, folder in ((BASE, made["base"]), (FT, made["ft"])):
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo)
    compress(BASE, FT, tmp / "hubdelta", params={"granularity": "row"}, codec="bitdelta", progress=False, cache_dir=tmp / "cc", endpoint=server.url)
    deltahub.push_to_hub(tmp / "hubdelta", DELTA, endpoint=server.url, **push)


# ------------------------------------------------------------------------------ top-level API


def test_import_deltahub_is_lazy() -> None:
    code = ("import sys, deltahub; heavy = [m for m in ('torch', 'transformers', 'huggingface_hub', 'safetensors') "
            "if m in sys.modules]; assert not heavy, heavy; print(deltahub.__version__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_one_public_api() -> None:
    for name in ("AutoDeltaModel", "Delta", "compress", "apply_delta", "pull", "push_to_hub", "Policy", "Rule",
                 "load_resident", "DeltaHubError", "HubError", "RepositoryNotFoundError", "__version__"):
        assert name in deltahub.__all__ and getattr(deltahub, name) is not None
    assert deltahub.Delta is __import__("deltahub.delta").delta.Delta
    assert deltahub.pull is __import__("deltahub.hub").hub.pull
    assert "AutoDeltaModel.from_pretrained" in deltahub.__doc__ and "pull" in deltahub.__doc__


def _imports(path: Path) -> set[str]:
    """Absolute module names a deltahub module imports anywhere (top level or inside functions)."""
    pkg = "deltahub" + ("." + ".".join(path.relative_to(ROOT / "deltahub").with_suffix("").parts)).removesuffix(".__init__")
    parts = pkg.split(".") if path.name == "__init__.py" else pkg.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(parts[: len(parts) - node.level + 1]) if node.level else ""
            mod = ".".join(p for p in (base, node.module or "") if p)
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_delta_never_imports_the_hub() -> None:
    delta = _imports(ROOT / "deltahub" / "delta.py")
    assert not any(m == "deltahub.hub" or m.startswith("deltahub.hub.") for m in delta), delta
    assert not any(m.startswith("deltahub.loading") for m in delta)
    hub_mods = sorted((ROOT / "deltahub" / "hub").glob("*.py"))
    assert {p.name for p in hub_mods} >= {"__init__.py", "_ids.py", "_errors.py", "_download.py", "_card.py", "_push.py", "_pull.py", "_info.py"}
    assert any("deltahub.delta" in _imports(p) for p in hub_mods)  # the one direction: hub -> delta


# ------------------------------------------------------------------------------ errors


def test_hub_errors_are_oserrors_with_hf_names() -> None:
    from deltahub import errors as e

    assert issubclass(e.HubError, OSError) and issubclass(e.HubError, e.DeltaHubError)
    assert e.RepoNotFoundError is e.RepositoryNotFoundError and e.RemoteFileNotFoundError is e.EntryNotFoundError
    assert issubclass(e.GatedRepoError, e.AuthenticationError) and issubclass(e.LocalEntryNotFoundError, e.DownloadError)
    err = e.EntryNotFoundError("no file x in a/b", repo_id="a/b", revision="main", filename="x")
    assert str(err) == "no file x in a/b" and (err.repo_id, err.revision, err.filename) == ("a/b", "main", "x")


def test_missing_repo_is_caught_as_oserror_with_attributes(hub_env: HubServer, tmp_path: Path) -> None:
    with pytest.raises(OSError) as ei:  # what transformers users write
        deltahub.pull("me/ghost@v1", tmp_path / "out", endpoint=hub_env.url, cache_dir=tmp_path / "c")
    assert isinstance(ei.value, deltahub.RepositoryNotFoundError)
    assert (ei.value.repo_id, ei.value.revision) == ("me/ghost", "v1") and "me/ghost" in str(ei.value)


# ------------------------------------------------------------------------------ push


def test_private_defaults_to_the_hub_default() -> None:
    from deltahub.hub import push_to_hub

    assert inspect.signature(push_to_hub).parameters["private"].default is None


def test_push_passes_private_none(hub_env: HubServer, made: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    original = HfApi.create_repo

    def spy(self: HfApi, repo_id: str, **kw: Any) -> Any:
        seen.append(kw.get("private", "missing"))
        return original(self, repo_id, **kw)

    monkeypatch.setattr(HfApi, "create_repo", spy)
    Delta.from_pretrained(made["delta"]).push_to_hub("me/vis", endpoint=hub_env.url)
    assert seen == [None]


def test_model_card_metadata(hub_env: HubServer, made: dict[str, Path], tmp_path: Path) -> None:
    _publish(hub_env, made, tmp_path, license="apache-2.0")
    card = ModelCard.load(hf_hub_download(DELTA, "README.md", endpoint=hub_env.url, cache_dir=tmp_path / "c0"))
    d = card.data
    assert (d.base_model, d.base_model_relation, d.pipeline_tag, d.license, d.library_name) == (
        BASE, "finetune", "text-generation", "apache-2.0", "deltahub")
    assert "deltahub" in d.tags and "bitdelta" in d.tags
    assert "| **total** |" in card.text and f"deltahub pull {DELTA}" in card.text

    # The fine-tune's own README in the delta directory: its license carries over.
    (tmp_path / "hubdelta" / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# my fine-tune\n")
    deltahub.push_to_hub(tmp_path / "hubdelta", DELTA, endpoint=hub_env.url)
    d = ModelCard.load(hf_hub_download(DELTA, "README.md", endpoint=hub_env.url, cache_dir=tmp_path / "c1")).data
    assert (d.license, d.language, d.base_model_relation) == ("mit", "en", "finetune")


# ------------------------------------------------------------------------------ AutoDeltaModel


def test_from_pretrained_signature_matches_transformers() -> None:
    params = inspect.signature(AutoDeltaModel.from_pretrained).parameters
    assert list(params)[0] == "pretrained_model_name_or_path"
    for name in ("revision", "token", "cache_dir", "local_files_only", "force_download", "dtype", "device_map",
                 "trust_remote_code", "base_model", "base_revision", "check_base", "endpoint", "progress"):
        assert name in params
    assert params["local_files_only"].default is False and params["dtype"].default is None


def _dtypes(model: Any) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters()}


def test_dtype_is_honoured(made: dict[str, Path]) -> None:
    d, base = str(made["delta"]), str(made["base"])
    assert _dtypes(AutoDeltaModel.from_pretrained(d, dtype=torch.bfloat16, base_model=base)) == {torch.bfloat16}
    assert _dtypes(AutoDeltaModel.from_pretrained(d, dtype="bfloat16", base_model=base)) == {torch.bfloat16}
    assert _dtypes(AutoDeltaModel.from_pretrained(d, dtype="auto", base_model=base)) == {torch.float32}  # the stored dtype
    with pytest.warns(FutureWarning, match="torch_dtype"):
        m = AutoDeltaModel.from_pretrained(pretrained_model_name_or_path=d, torch_dtype=torch.bfloat16, base_model=base)
    assert _dtypes(m) == {torch.bfloat16}


def test_dtype_keyword_on_to_model_and_load_resident(made: dict[str, Path]) -> None:
    """``dtype=`` (transformers' name) works on Delta.to_model and load_resident, beside the older ``torch_dtype``;
    it was silently dropped before (the checkpoint dtype won)."""
    from deltahub.delta import Delta
    from deltahub.resident import load_resident

    d = Delta(made["delta"])
    assert _dtypes(d.to_model(made["base"], dtype=torch.bfloat16)) == {torch.bfloat16}
    assert _dtypes(d.to_model(made["base"], torch_dtype=torch.bfloat16)) == {torch.bfloat16}
    with pytest.raises(ValueError, match="disagree"):
        d.to_model(made["base"], dtype=torch.bfloat16, torch_dtype=torch.float16)
    model = load_resident(made["base"], {"a": made["delta"]}, dtype=torch.bfloat16)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16


def test_device_map_rebuilds_once_into_the_cache(made: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELTAHUB_CACHE", str(tmp_path / "dh"))
    d, base = str(made["delta"]), str(made["base"])
    ref = AutoDeltaModel.from_pretrained(d, base_model=base)
    m1 = AutoDeltaModel.from_pretrained(d, base_model=base, device_map="cpu", dtype=torch.bfloat16)
    built = list((tmp_path / "dh" / "rebuilt").iterdir())
    assert len(built) == 1 and (built[0] / "config.json").is_file()
    stamp = (built[0] / "model.safetensors").stat().st_mtime_ns
    m2 = AutoDeltaModel.from_pretrained(d, base_model=base, device_map="cpu")
    assert (built[0] / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert _dtypes(m1) == {torch.bfloat16} and _dtypes(m2) == {torch.float32} and not m2.training
    for (n, a), (_, b) in zip(ref.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n


def test_custom_code_needs_trust_remote_code(made: dict[str, Path], tmp_path: Path) -> None:
    ft = tmp_path / "ft"
    ft.mkdir()
    for f in made["ft"].iterdir():
        (ft / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((ft / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (ft / "config.json").write_text(json.dumps(cfg))
    compress(made["base"], ft, tmp_path / "delta", params={"granularity": "row"}, codec="bitdelta", progress=False)
    with pytest.raises(deltahub.RemoteCodeError, match="trust_remote_code=True") as ei:
        AutoDeltaModel.from_pretrained(str(tmp_path / "delta"), base_model=str(made["base"]))
    assert len(str(ei.value).splitlines()) == 1


def test_local_files_only_and_force_download_reach_both_downloads(hub_env: HubServer, made: dict[str, Path], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import deltahub.hub._download as dl

    _publish(hub_env, made, tmp_path)
    calls: list[tuple[str, bool, bool]] = []
    real = dl.snapshot_download

    def spy(repo_id: str, **kw: Any) -> str:
        calls.append((repo_id, kw["local_files_only"], kw["force_download"]))
        return real(repo_id, **kw)

    monkeypatch.setattr(dl, "snapshot_download", spy)
    cache = tmp_path / "c"
    AutoDeltaModel.from_pretrained(DELTA, endpoint=hub_env.url, cache_dir=cache, force_download=True)
    AutoDeltaModel.from_pretrained(DELTA, endpoint=hub_env.url, cache_dir=cache, local_files_only=True)
    assert calls == [(DELTA, False, True), (BASE, False, True), (DELTA, True, False), (BASE, True, False)]
    with pytest.raises(deltahub.LocalEntryNotFoundError, match="local_files_only"):
        deltahub.pull(DELTA, tmp_path / "out", endpoint=hub_env.url, cache_dir=tmp_path / "empty", local_files_only=True)


MODELING = '''
from transformers import LlamaForCausalLM


class XForCausalLM(LlamaForCausalLM):
    custom_marker = "from the base repo's code"
'''


def test_custom_code_loads_with_the_base_code(made: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """trust_remote_code=True: the rebuilt fine-tune is loaded with the modeling code of the base (the delta has no code)."""
    monkeypatch.setenv("DELTAHUB_CACHE", str(tmp_path / "dh"))
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # never the user's module cache
    monkeypatch.syspath_prepend(str(tmp_path / "modules"))
    dirs = {}
    for role in ("base", "ft"):
        d = dirs[role] = tmp_path / role
        d.mkdir()
        for f in made[role].iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        cfg = json.loads((d / "config.json").read_text())
        cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
        cfg["architectures"] = ["XForCausalLM"]
        (d / "config.json").write_text(json.dumps(cfg))
    (dirs["base"] / "modeling_x.py").write_text(MODELING)
    compress(dirs["base"], dirs["ft"], tmp_path / "delta", params={"granularity": "row"}, codec="bitdelta", progress=False)
    assert not list((tmp_path / "delta").glob("*.py"))  # the delta format carries no code
    model = AutoDeltaModel.from_pretrained(str(tmp_path / "delta"), base_model=str(dirs["base"]), trust_remote_code=True)
    assert type(model).__name__ == "XForCausalLM" and model.custom_marker == "from the base repo's code"
    ref = AutoDeltaModel.from_pretrained(str(made["delta"]), base_model=str(made["base"]))
    for (n, a), (_, b) in zip(ref.state_dict().items(), model.state_dict().items()):
        assert torch.allclose(a, b, atol=0.05), n


def test_delta_module_alone_names_the_hub_layer(made: dict[str, Path]) -> None:
    """deltahub.delta does not import the hub; opened alone, a Hub id gets a one-line hint (deltahub.Delta has the Hub)."""
    code = ("import sys; from deltahub.delta import Delta; from deltahub.errors import MissingFileError\n"
            "assert 'deltahub.hub' not in sys.modules\n"
            f"assert Delta.from_pretrained({str(made['delta'])!r}).manifest is not None\n"
            "try:\n    Delta.from_pretrained('org/not-here')\nexcept MissingFileError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert "deltahub.Delta" in r.stdout


def test_cli_push_passes_private_none_unless_asked(hub_env: HubServer, made: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from deltahub.cli import app

    seen: list[Any] = []
    original = HfApi.create_repo

    def spy(self: HfApi, repo_id: str, **kw: Any) -> Any:
        seen.append(kw.get("private", "missing"))
        return original(self, repo_id, **kw)

    monkeypatch.setattr(HfApi, "create_repo", spy)
    for args, want in (([], None), (["--private"], True), (["--public"], False)):
        r = CliRunner().invoke(app, ["push", str(made["delta"]), "me/cli-vis", *args, "--endpoint", hub_env.url, "-q"])
        assert r.exit_code == 0, r.output
        assert seen[-1] is want
