"""The configuration reference: one source (the settings models) for `collab config`,
docs/configuration.md and the TOML file of `collab serve --config`."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx

from collab import configref
from tests.support import ROOT

DOC = ROOT / "docs" / "configuration.md"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("COLLAB_")}
    return subprocess.run(
        [sys.executable, "-m", "collab", *args],
        cwd=ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_document_is_generated_from_the_models():
    assert DOC.read_text() == configref.render_markdown(), (
        "docs/configuration.md differs from the settings models: run "
        "`.venv/bin/collab config --markdown > docs/configuration.md`"
    )


def test_every_setting_is_described_once():
    entries = configref.entries()
    assert len(entries) >= 80
    names = [e.env for e in entries]
    assert len(names) == len(set(names)), "two models declare the same setting"
    assert [e.env for e in entries if not e.description] == []
    assert {e.name for e in entries if e.secret} >= {"jwt_secret", "metrics_token", "backend_token"}


def test_config_prints_effective_values_with_secrets_masked():
    secret = "s" * 40
    done = run_cli(
        "config",
        env={"COLLAB_PORT": "9123", "COLLAB_JWT_SECRET": secret, "COLLAB_BACKEND_TOKEN": "backend-pass-123"},
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert secret not in out and "backend-pass-123" not in out
    block = out.split("COLLAB_PORT ", 1)[1].split("\nCOLLAB_", 1)[0]
    assert "effective: 9123" in block
    for env in ("COLLAB_JWT_SECRET", "COLLAB_BACKEND_TOKEN"):
        assert "effective: ***" in out.split(env + " ", 1)[1].split("\nCOLLAB_", 1)[0]
    for e in configref.entries():
        assert f"\n{e.env} " in "\n" + out, f"{e.env} missing from `collab config`"


def test_toml_file_applies_and_environment_wins(tmp_path):
    toml = tmp_path / "collab.toml"
    toml.write_text('port = 9001\nmax_rooms = 17\n[forwarding]\nforward_batch_max = 33\n')
    done = run_cli("config", "--config", str(toml), env={"COLLAB_PORT": "9002"})
    assert done.returncode == 0, done.stderr

    def effective(env: str) -> str:
        return done.stdout.split(env + " ", 1)[1].split("effective: ", 1)[1].split("\n", 1)[0]

    assert effective("COLLAB_PORT") == "9002"  # the environment wins
    assert effective("COLLAB_MAX_ROOMS") == "17"
    assert effective("COLLAB_FORWARD_BATCH_MAX") == "33"


def test_toml_unknown_keys_are_refused_by_name(tmp_path):
    toml = tmp_path / "collab.toml"
    toml.write_text('prot = 9001\n')
    done = run_cli("serve", "--config", str(toml))
    assert done.returncode == 2
    assert "unknown setting 'prot'" in done.stderr and "did you mean 'port'" in done.stderr
    toml.write_text('[server]\nport = "many"\n')
    done = run_cli("serve", "--config", str(toml))
    assert done.returncode == 2 and "port" in done.stderr
    toml.write_text('port = \n')
    done = run_cli("config", "--config", str(toml))
    assert done.returncode == 2 and "not valid TOML" in done.stderr


def test_serve_reads_the_toml_file(server_factory, tmp_path):
    toml = tmp_path / "collab.toml"
    toml.write_text(
        'node_id = "from-file"\nmax_connections_per_ip = 3\n'
        '[forwarding]\nbackend_url = "http://127.0.0.1:9"\nready_requires_backend = false\n'
    )
    server = server_factory(env={"COLLAB_NODE_ID": "from-env"}, args=["--config", str(toml)])
    metrics = httpx.get(f"{server.http_url}/metrics", timeout=5).text
    assert 'node="from-env"' in metrics  # the environment wins over the file
    ready = httpx.get(f"{server.http_url}/readyz", timeout=5).json()
    # The forwarding settings came from the file: a backend that is down, not required.
    assert "not required" in ready["checks"]["forwarding"], ready


def test_the_document_model_page_is_generated_from_the_model():
    from collab import modeldoc

    assert (ROOT / "docs" / "config-model.md").read_text() == modeldoc.render(modeldoc.default_model()), (
        "docs/config-model.md differs from the model: run "
        "`.venv/bin/collab config --document-model > docs/config-model.md`"
    )
    paths = [path for path, _, _ in modeldoc.rows(modeldoc.default_model())]
    assert "connection.host" in paths and "credentials.secret_ref" in paths
