"""``circuitexplain llm serve``: run the default explainer LLM locally (vLLM, OpenAI-compatible) or stop it.

Registered through the entry point ``llm = "evals.cli_llm:register"``. The model name is resolved here (a
pretrained name through ``circuits.pretrained.ensure_model``, a zoo name, or a HuggingFace directory);
:mod:`explainers.llm.server` starts and stops the process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """\
The server runs from its own virtualenv (vLLM pins its own torch): $CIRCUITEXPLAIN_VLLM_VENV or .venv-vllm
in the repository, built by `make vllm-venv`. It takes about 20 s to become ready and 3.3 GB of memory, and
uses every core while busy: stop it when you are done. Its log and state file live in
$CIRCUITEXPLAIN_CACHE/llm/servers/.

examples:
  circuitexplain llm serve                          # smollm2-135m on http://127.0.0.1:8000/v1
  circuitexplain llm serve --model ioi-2l --port 8011
  circuitexplain llm serve --stop                   # stop the server on port 8000
  circuitexplain llm serve --stop --all             # stop every server started this way
With a GPU, run any model in your own vLLM (`vllm serve MODEL --tensor-parallel-size N`) or use OpenAI, and
pass its URL to the explainers (--llm-base-url http://host:8000/v1 --llm-model MODEL, or OPENAI_BASE_URL and
OPENAI_API_KEY).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("llm", help="the explainer LLM: serve it locally with vLLM",
                                  description="The explainer LLM (an OpenAI-compatible endpoint).")
    group.set_defaults(_group_parser=group)
    sub = group.add_subparsers(dest="llm_command", metavar="COMMAND")
    p = sub.add_parser("serve", help="start (or --stop) a local vLLM server on 127.0.0.1",
                       description="Start a vLLM OpenAI-compatible server on 127.0.0.1 serving MODEL under its own "
                                   "name, wait until /health answers, and print its base URL; or stop it.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="pretrained name (smollm2-135m, converted on first use), zoo name, or HF model directory "
                        "(default smollm2-135m)")
    p.add_argument("--name", help="model name the endpoint serves (default: --model, or the directory's name)")
    p.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (default 8000)")
    p.add_argument("--stop", action="store_true", help="stop the server on --port (SIGTERM its process group, "
                                                       "then SIGKILL) instead of starting one")
    p.add_argument("--all", action="store_true", help="with --stop: stop every server started this way")
    p.add_argument("--max-model-len", type=int, default=2048, help="context length (default 2048; 256 is too "
                                                                   "small for explanation prompts)")
    p.add_argument("--kv-cache-gb", type=int, default=1, help="KV cache in GiB (VLLM_CPU_KVCACHE_SPACE; default 1)")
    p.add_argument("--dtype", default="bfloat16", help="weights dtype (default bfloat16)")
    p.add_argument("--threads", type=int, help="CPU threads, unbound (default: vLLM binds one per core; on a "
                                               "machine shared with busy processes --threads 1 decodes faster)")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for /health (default 600)")
    p.set_defaults(func=serve)


def resolve_model(model: str) -> Path:
    """A served model's HuggingFace directory: a local dir, a zoo checkpoint, or a pretrained name."""
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    from circuits.zoo import RECIPES, checkpoint_dir

    if model in RECIPES:
        return checkpoint_dir(model)
    from circuits import pretrained

    return pretrained.ensure_model(model)


def serve(args: argparse.Namespace) -> int:
    from explainers.llm import server

    if args.stop:
        ports = [s.port for s in server.running_servers()] if args.all else [args.port]
        for port in ports:
            state = server.stop_server(port)
            print(f"stopped {state.model} on port {port}" if state else f"no server recorded on port {port}")
        return 0
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    server.vllm_python()  # fail on a missing venv before converting any model
    model_dir = resolve_model(args.model)
    name = args.name or (args.model if not Path(args.model).expanduser().is_dir() else model_dir.name)
    print(f"starting vLLM for {name} ({model_dir}) on 127.0.0.1:{args.port} ...", file=sys.stderr)
    state = server.start_server(model_dir, name=name, port=args.port, max_model_len=args.max_model_len,
                                kv_cache_gb=args.kv_cache_gb, dtype=args.dtype, threads=args.threads,
                                wait_s=args.timeout)
    print(state.base_url)
    print(f"ready: --llm-base-url {state.base_url} --llm-model {name}  (stop: circuitexplain llm serve --stop "
          f"--port {args.port}; log {state.log})", file=sys.stderr)
    return 0
