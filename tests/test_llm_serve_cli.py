"""`circuitexplain llm serve` refusals that need no server (the real start/stop is in test_vllm_integration)."""

from __future__ import annotations

import socket
import subprocess
import sys

from explainers.llm import server as srv


def ce(*args, env=None):
    return subprocess.run([sys.executable, "-m", "circuits.cli", "llm", "serve", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def test_stop_without_a_server_and_missing_venv(tmp_path):
    import os

    env = {**os.environ, "CIRCUITEXPLAIN_CACHE": str(tmp_path), "CIRCUITEXPLAIN_VLLM_VENV": str(tmp_path / "none")}
    r = ce("--stop", "--port", "18999", env=env)
    assert r.returncode == 0 and "no server recorded on port 18999" in r.stdout
    r = ce("--model", str(tmp_path), env=env)
    assert r.returncode == 2 and "no vLLM virtualenv at" in r.stderr and "make vllm-venv" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_start_refuses_bad_model_dir_and_busy_port(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITEXPLAIN_CACHE", str(tmp_path))
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    try:
        srv.start_server(tmp_path, name="m", venv=venv)
        raise AssertionError("a directory without config.json must be refused")
    except ValueError as e:
        assert "no config.json" in str(e)
    (tmp_path / "config.json").write_text("{}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        try:
            srv.start_server(tmp_path, name="m", port=port, venv=venv)
            raise AssertionError("a port with a listener must be refused")
        except ValueError as e:
            assert f"port {port} on 127.0.0.1 is in use" in str(e)
    assert srv.running_servers() == []
