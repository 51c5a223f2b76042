"""``python -m minimind_course.serve``: a local OpenAI-compatible endpoint for MiniMind.

No ``--model`` serves the bundled MiniMind-Tiny. ``--backend vllm`` hands the same options to vLLM instead.
Mistakes (port in use, bad model path) end with one line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys

from minimind_course.engine.config import MIB, EngineConfig
from minimind_course.launch import bind_socket
from minimind_course.serving.response_store import DEFAULT_MAX_ENTRIES

DTYPES = ("auto", "float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m minimind_course.serve",
        description="Serve a MiniMind model behind an OpenAI-compatible API (/v1/chat/completions, /v1/completions, "
        "/v1/models, /health).",
        epilog="With --backend vllm, arguments after a lone -- go to vLLM unchanged, e.g. "
        "`--backend vllm -- --tensor-parallel-size 2 --gpu-memory-utilization 0.8`.",
    )
    parser.add_argument("--model", default=None,
                        help="model folder or .pth checkpoint (default: the bundled MiniMind-Tiny)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 opens it to the network (then set --api-key)")
    parser.add_argument("--port", type=int, default=8998)
    parser.add_argument("--served-model-name", default="minimind", help="the model name clients must send")
    parser.add_argument("--api-key", default=os.environ.get("MINIMIND_API_KEY") or None,
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $MINIMIND_API_KEY, else open)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="context length in tokens (default: the model's max_position_embeddings)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="weights dtype (auto: fp32 on CPU)")
    parser.add_argument("--cors-origins", default=None,
                        help="comma-separated origins browsers may call from, * for any (default: pages on this "
                             "machine, localhost/127.0.0.1/[::1] on any port, and browser extensions)")
    parser.add_argument("--max-tokens-overflow", default="clamp", choices=("clamp", "error"),
                        help="a max_tokens beyond what the context leaves: clamp it (finish_reason length, as "
                             "llama.cpp) or refuse it with a 400 (as vLLM)")
    parser.add_argument("--max-stored-responses", type=int, default=DEFAULT_MAX_ENTRIES,
                        help="Responses API answers kept in memory for previous_response_id and GET "
                             "/v1/responses/{id}; the least recently used are forgotten first")
    parser.add_argument("--max-queue", type=int, default=EngineConfig.max_queue,
                        help="requests that may wait for a seat in the running batch; more get HTTP 429")
    parser.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs,
                        help="sequences decoded together in one batch (n choices count n); vLLM's flag of the same "
                        "name (also passed to --backend vllm)")
    parser.add_argument("--kv-cache-memory", type=int, default=EngineConfig.kv_cache_memory // MIB, metavar="MIB",
                        help="MiB of KV cache (blocks of 16 tokens); a request waits until its prompt fits")
    parser.add_argument("--max-num-batched-tokens", type=int, default=EngineConfig.max_num_batched_tokens,
                        help="prompt tokens prefilled per step: longer prompts are chunked so running streams "
                        "keep flowing (vLLM's chunked prefill); set it to --max-model-len to turn chunking off")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                        default=EngineConfig.enable_prefix_caching,
                        help="reuse the KV blocks of prompt prefixes seen before (vLLM's automatic prefix caching: "
                        "full 16-token blocks, least recently used evicted first; default: on)")
    parser.add_argument("--max-body-bytes", type=int, default=2 * 1024 * 1024,
                        help="largest request body accepted; larger ones get HTTP 413")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1-2 is often fastest for tiny models)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    parser.add_argument("--backend", default="minimind", choices=("minimind", "vllm"),
                        help="minimind: this package's server; vllm: real vLLM on an exported copy of the model")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                        help="serve an upstream LoRA adapter .pth as model NAME next to the base (repeatable); "
                        "requests pick it with \"model\": \"NAME\"")
    parser.add_argument("--rope-scaling", choices=("yarn",), default=None,
                        help="upstream's YaRN rope scaling for a .pth (a folder's config.json says it itself); "
                        "then --max-model-len may exceed the original 2048 positions")
    parser.add_argument("--tool-grammar", choices=("lazy", "off"), default=None,
                        help="tool_choice auto: lazy (default) lets the model write freely until it starts a "
                        "<tool_call>, then only a valid call of an offered function; off leaves auto unconstrained, "
                        "as vLLM does (forced calls and JSON output are constrained either way)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Our flags; with ``--backend vllm``, everything after a lone ``--`` goes to vLLM verbatim (``vllm_args``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    vllm_args = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = build_parser()
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if vllm_args and args.backend != "vllm":
        parser.error("arguments after -- are passed to vLLM: they need --backend vllm")
    args.vllm_args = vllm_args
    if args.backend == "vllm" and args.tool_grammar == "lazy":
        parser.error("--tool-grammar lazy is this package's server only: vLLM leaves tool_choice auto unconstrained "
                     "(leave the flag out, or pass --tool-grammar off)")
    args.tool_grammar = args.tool_grammar or ("lazy" if args.backend == "minimind" else "off")
    if args.cors_origins is not None:
        args.cors_origins = [origin.strip() for origin in args.cors_origins.split(",") if origin.strip()]
    args.lora = parse_lora(parser, args.lora, args.served_model_name)
    for flag in ("max_num_seqs", "kv_cache_memory", "max_num_batched_tokens", "max_stored_responses"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def parse_lora(parser: argparse.ArgumentParser, specs: list[str], base_name: str) -> dict[str, str]:
    """``--lora NAME=PATH`` flags as {name: path}; a malformed, repeated or base-clashing name is a usage error."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = (part.strip() for part in spec.partition("="))
        if not sep or not name or not path:
            parser.error(f"--lora expects NAME=PATH, not {spec!r}")
        if name in adapters or name == base_name:
            parser.error(f"--lora name {name!r} is used twice (adapter names and --served-model-name must differ)")
        adapters[name] = path
    return adapters


def claim_port(host: str, port: int) -> socket.socket:
    """Claim the port before the (slow) model load, so a busy port fails at once."""
    try:
        return bind_socket(host, port)
    except OSError as err:
        raise SystemExit(f"error: cannot listen on {host}:{port}: {err.strerror or err}") from None


def serve_minimind(args: argparse.Namespace) -> int:
    sock = claim_port(args.host, args.port)  # before the heavy imports: a busy port fails in a blink
    import uvicorn

    import torch

    from minimind_course.engine.engine import Engine
    from minimind_course.model.loading import load_model
    from minimind_course.serving.app import create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer = load_model(args.model, device=args.device, dtype=None if args.dtype == "auto" else args.dtype,
                                      rope_scaling=args.rope_scaling, lora=args.lora or None)
    except Exception as err:  # any load failure is reported as one line: path, format, device, dtype...
        sock.close()
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        named = [args.model, *args.lora.values()]
        if args.model and not any(path and path in message for path in named):  # e.g. "header too large"
            message = f"{args.model}: {message}"
        raise SystemExit(f"error: cannot load the model: {message}") from None
    try:
        engine = Engine(model, tokenizer, max_model_len=args.max_model_len, max_queue=args.max_queue,
                        max_num_seqs=args.max_num_seqs, kv_cache_memory=args.kv_cache_memory * MIB,
                        max_num_batched_tokens=args.max_num_batched_tokens,
                        enable_prefix_caching=args.enable_prefix_caching)
    except ValueError as err:  # a KV cache too small for one max_model_len sequence, a bad max_model_len
        sock.close()
        raise SystemExit(f"error: {err}") from None
    app = create_app(engine, served_model_name=args.served_model_name, api_key=args.api_key,
                     cors_origins=args.cors_origins, max_body_bytes=args.max_body_bytes,
                     max_tokens_overflow=args.max_tokens_overflow, tool_grammar=args.tool_grammar,
                     max_stored_responses=args.max_stored_responses)
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    adapters = "".join(f"  lora={name!r}" for name in engine.lora_names)
    print(f"MiniMind OpenAI-compatible server: http://{shown_host}:{args.port}/v1  "
          f"model={args.served_model_name!r}{adapters}  "
          f"max_model_len={engine.max_model_len}  api_key={'on' if args.api_key else 'off'}", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print("warning: listening on the network without --api-key: anyone who can reach this port can use it",
              file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5))
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # a shell starts `serve ... &` with SIGINT ignored;
        signal.signal(signal.SIGINT, signal.default_int_handler)  # uvicorn stops on it anyway: exit as Ctrl+C does
    try:
        server.run(sockets=[sock])  # uvicorn re-raises Ctrl+C / SIGTERM after a graceful shutdown
    except KeyboardInterrupt:
        return 130
    finally:
        engine.close()
        sock.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s:  %(name)s  %(message)s")
    if args.backend == "vllm":
        from minimind_course.serving.vllm_launcher import serve_vllm, vllm_installed, vllm_problem

        if vllm_installed() and (problem := vllm_problem()) is not None:
            raise SystemExit(f"error: {problem} (see docs/troubleshooting.md)")
        return serve_vllm(args)  # reports a missing vLLM itself, with the install command
    return serve_minimind(args)


if __name__ == "__main__":
    sys.exit(main())
