"""``python -m minimind_course.bench``: benchmark any OpenAI-compatible endpoint (our server, vLLM, others).

    python -m minimind_course.bench sweep --base-url http://localhost:8998/v1 --concurrency 1,4,16 --out ours.json

``sweep`` (the default when no subcommand is named) drives the endpoint at each concurrency level with streamed,
greedy, fixed-length requests and reports TTFT, inter-token latency and tokens/s; the measuring lives in
``minimind_course.bench.loadgen``. ``overhead`` compares our server over HTTP+SSE with the same engine in-process
(``minimind_course.bench.overhead``). ``batching`` runs ours serial vs ours batched vs vLLM and the engine's own
measurements (``minimind_course.bench.batching``), writing JSON and a plot. Mistakes end with one line on stderr
and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import httpx

from minimind_course.bench.loadgen import (
    DEFAULT_CONCURRENCY,
    SweepConfig,
    format_server_view,
    format_table,
    server_metrics,
    sweep,
    sweep_report,
)
from minimind_course.bench.overhead import OverheadConfig, format_overhead, measure_overhead
from minimind_course.engine.config import EngineConfig

SUBCOMMANDS = ("sweep", "overhead", "batching", "prefix")
ROUNDS_HELP = ("waves of C requests at least at each level C: a level sends max(--requests-per-level, rounds x C), so "
               "most requests run with C others in flight (one wave has no steady state; default: %(default)s)")


def concurrency_list(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]`` (argparse type)."""
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not levels or any(level < 1 for level in levels):
        raise argparse.ArgumentTypeError(f"concurrency levels must be positive integers, got {text!r}")
    return levels


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """How much each level sends, the same for ``sweep`` and ``batching``."""
    parser.add_argument("--requests-per-level", type=positive_int, default=32,
                        help="requests sent at each level, at least (default: %(default)s)")
    parser.add_argument("--rounds", type=positive_int, default=4, help=ROUNDS_HELP)
    parser.add_argument("--max-tokens", type=positive_int, default=64,
                        help="tokens generated per request (default: %(default)s)")


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8998/v1", help="OpenAI base URL, ending in /v1")
    parser.add_argument("--model", default="minimind", help="served model name")
    parser.add_argument("--api-key", default="not-needed", help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--concurrency", type=concurrency_list, default=list(DEFAULT_CONCURRENCY),
                        help="comma-separated levels (default: %(default)s)")
    add_load_arguments(parser)
    parser.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                        help="let answers stop at end-of-sequence (default: every answer is exactly --max-tokens)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="write the full results as JSON to this file")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minimind_course.bench",
                                     description="Benchmark an OpenAI-compatible endpoint.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_sweep_arguments(commands.add_parser(
        "sweep", help="concurrency sweep: TTFT, inter-token latency, tokens/s per level (the default)",
        description="Streamed greedy chat requests at increasing concurrency; prints a table, --out writes JSON.",
    ))  # fmt: skip
    over = commands.add_parser("overhead", help="our server's tokens/s over HTTP+SSE vs in-process, and TTFT",
                               description="Same model, same prompt, greedy fixed-length requests, alternating "
                               "between a served subprocess and an in-process engine.")
    over.add_argument("--model", default=None, help="model folder or .pth (default: the bundled model)")
    over.add_argument("--tokens", type=positive_int, default=256, help="tokens per request (default: %(default)s)")
    over.add_argument("--runs", type=positive_int, default=5, help="throughput requests per side (median reported)")
    over.add_argument("--ttft-runs", type=positive_int, default=20, help="short requests per side for TTFT")
    over.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    over.add_argument("--out", type=Path, default=None, help="write the results as JSON to this file")
    batch = commands.add_parser("batching", help="ours serial vs ours batched vs vLLM, prefill stall, batch scaling",
                                description="Starts each server in turn, sweeps it with the same streamed greedy "
                                "requests, reads its /metrics; then measures the engine in-process.")
    batch.add_argument("--concurrency", type=concurrency_list, default=[1, 16], help="levels (default: 1,16)")
    add_load_arguments(batch)
    batch.add_argument("--max-num-seqs", type=positive_int, default=EngineConfig.max_num_seqs,
                       help="seats of the batched servers")
    batch.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    batch.add_argument("--no-vllm", dest="vllm", action="store_false", help="skip real vLLM")
    batch.add_argument("--out", type=Path, default=Path("batching.json"), help="JSON file (default: %(default)s)")
    batch.add_argument("--plot", type=Path, default=Path("batching.png"), help="PNG file (default: %(default)s)")
    prefix = commands.add_parser("prefix", help="prefix caching in-process: cold vs warm TTFT, cache on vs off",
                                 description="Cold vs warm time to first token on a multi-turn chat, the share of a "
                                 "10-turn chat's prompt found cached, throughput at a 0 % hit rate; cache off, then on.")
    prefix.add_argument("--model", default=None, help="model folder or .pth (default: the bundled MiniMind-Tiny)")
    prefix.add_argument("--prompt-tokens", type=positive_int, default=800, help="chat length (default: %(default)s)")
    prefix.add_argument("--rounds", type=positive_int, default=5, help="conversations per setting (default: 5)")
    prefix.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    prefix.add_argument("--out", type=Path, default=Path("prefix.json"), help="JSON file (default: %(default)s)")
    return parser


def run_prefix_command(args: argparse.Namespace) -> int:
    from minimind_course.bench.prefix import PrefixConfig, format_prefix, measure_prefix

    config = PrefixConfig(model=args.model, prompt_tokens=args.prompt_tokens, rounds=args.rounds,
                          threads=args.threads)
    try:
        report = measure_prefix(config)
    except (RuntimeError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_prefix(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"results written to {args.out}")
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    config = SweepConfig(
        base_url=args.base_url, model=args.model, api_key=args.api_key, concurrency=args.concurrency,
        requests_per_level=args.requests_per_level, rounds=args.rounds, max_tokens=args.max_tokens,
        ignore_eos=args.ignore_eos, timeout=args.timeout,
    )  # fmt: skip
    try:
        results = asyncio.run(sweep(config, progress=args.progress))
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{config.base_url}  model={config.model!r}  max_tokens={config.max_tokens}  "
          f"requests/level=max({config.requests_per_level}, {config.rounds} x concurrency)")
    print(format_table(results))
    view = server_metrics(config.base_url)
    if view is not None:  # next to the client's measurements: what the server itself counted
        print(format_server_view(view))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = sweep_report(config, results) | {"server_metrics": view}
        args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"results written to {args.out}")
    failed = sum(level.errors for level in results)
    if failed:
        first = next(record.error for level in results for record in level.records if record.error)
        print(f"error: {failed} request(s) failed; first: {first}", file=sys.stderr)
        return 1
    return 0


def run_overhead(args: argparse.Namespace) -> int:
    config = OverheadConfig(model=args.model, tokens=args.tokens, runs=args.runs, ttft_runs=args.ttft_runs,
                            threads=args.threads)
    try:
        report = measure_overhead(config)
    except (RuntimeError, OSError, ValueError, httpx.HTTPError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_overhead(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"results written to {args.out}")
    return 0


def run_batching_command(args: argparse.Namespace) -> int:
    from minimind_course.bench.batching import BatchingConfig, format_batching, plot_batching, run_batching

    config = BatchingConfig(concurrency=tuple(args.concurrency), requests_per_level=args.requests_per_level,
                            rounds=args.rounds, max_tokens=args.max_tokens, max_num_seqs=args.max_num_seqs,
                            threads=args.threads, vllm=args.vllm)
    try:
        report = run_batching(config)
    except (RuntimeError, OSError, httpx.HTTPError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_batching(report))
    for path in (args.out, args.plot):
        path.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    plot_batching(report, args.plot)
    print(f"results written to {args.out} and {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "sweep")  # `bench --base-url ...` means `bench sweep --base-url ...`
    args = build_parser().parse_args(argv)
    runners = {"sweep": run_sweep, "overhead": run_overhead, "batching": run_batching_command,
               "prefix": run_prefix_command}
    return runners[args.command](args)
