"""Pytest fixtures running a local :class:`~deltahub.testing.hub_server.HubServer`.

Use them from a test module or ``conftest.py``::

    from deltahub.testing.fixtures import hub_env, hub_server, hub_server_factory  # noqa: F401

or register the module as a plugin in the root ``conftest.py``:
``pytest_plugins = ["deltahub.testing.fixtures"]``.

Why the env fixture patches module constants too: ``huggingface_hub`` reads ``HF_ENDPOINT``,
``HF_HUB_CACHE``, ``HF_HOME``, ``HF_HUB_DISABLE_XET``, ``HF_HUB_DISABLE_TELEMETRY``, the token
path, ... **once, at import time** (``huggingface_hub.constants``), and the module-level helper
functions (``huggingface_hub.upload_file``, ``create_repo``, ...) are bound to an ``HfApi``
instance created at import time. Setting environment variables in a test is therefore not
enough once the library is imported. The most reliable route in library code is still to pass
``endpoint=`` (``HfApi(endpoint=...)``, ``hf_hub_download(..., endpoint=...)``) and ``cache_dir=``
explicitly; :func:`configure_hf_client` makes code that does not do so hit the local server too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deltahub.testing.hub_server import HubServer

__all__ = ["configure_hf_client", "hub_env", "hub_server", "hub_server_factory"]


def configure_hf_client(
    monkeypatch: pytest.MonkeyPatch, endpoint: str, hf_home: str | os.PathLike[str], token: str | None = None
) -> None:
    """Point ``huggingface_hub`` (env vars *and* already-imported constants) at ``endpoint``.

    Sets ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_DISABLE_XET=1`` (uploads must
    take the LFS path), ``HF_HUB_DISABLE_TELEMETRY=1`` (also stops the client from fetching its
    agent registry from ``ENDPOINT``), isolates the token (``HF_TOKEN`` = ``token`` or unset, token
    files under ``hf_home``) and patches the matching ``huggingface_hub.constants`` values plus
    the endpoint of the import-time ``huggingface_hub.hf_api.api`` instance. All changes are
    undone by ``monkeypatch`` at teardown.
    """
    home = Path(hf_home)
    hub_cache = home / "hub"
    hub_cache.mkdir(parents=True, exist_ok=True)
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_CO_STAGING", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)

    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - env vars alone are enough if it is imported later
        return
    patches: dict[str, Any] = {
        "ENDPOINT": endpoint.rstrip("/"),
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint.rstrip("/") + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
        "HF_HUB_OFFLINE": False,
        "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(home / ".check_for_skill_update_done"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
    }
    for name, value in patches.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    try:
        from huggingface_hub import hf_api

        monkeypatch.setattr(hf_api.api, "endpoint", endpoint.rstrip("/"))
    except (ImportError, AttributeError):  # pragma: no cover - layout changed upstream
        pass
    try:
        from huggingface_hub.utils import _cache_manager

        monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", str(hub_cache), raising=False)
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture
def hub_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., HubServer]]:
    """Factory ``make(root=None, **kwargs) -> HubServer`` (started); all are stopped at teardown.

    Use it for servers with a ``token`` or to restart on the same ``root`` (persistence).
    """
    servers: list[HubServer] = []

    def make(root: str | os.PathLike[str] | None = None, **kwargs: Any) -> HubServer:
        server = HubServer(root if root is not None else tmp_path_factory.mktemp("hub_root"), **kwargs)
        servers.append(server.start())
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def hub_server(hub_server_factory: Callable[..., HubServer]) -> HubServer:
    """A running open (no token) :class:`HubServer` with a fresh ``tmp_path``-based root."""
    return hub_server_factory()


@pytest.fixture
def hub_env(
    hub_server: HubServer, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> HubServer:
    """``hub_server`` plus a ``huggingface_hub`` environment pointing at it (see :func:`configure_hf_client`).

    Returns the server; ``HF_HUB_CACHE`` is a fresh temp dir (read it from the env or
    ``huggingface_hub.constants.HF_HUB_CACHE``). Everything is restored at teardown.
    """
    configure_hf_client(monkeypatch, hub_server.url, tmp_path_factory.mktemp("hf_home"), token=hub_server.token)
    return hub_server
