"""Chat in the terminal with any OpenAI-compatible server: ``python -m minimind_course.chat --help``.

Interactive when stdin is a terminal. When stdin is piped, each line is one user message and each answer is
printed on its own line(s), so a conversation can be scripted. ``--history N`` counts whole question/answer
pairs (0 = every question stands alone). stdout carries answers and what commands were asked to show; notes and
errors go to stderr, and any error in piped mode stops with exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import TextIO

import openai

from minimind_course.client.session import (
    DEFAULT_API_KEY,
    DEFAULT_BASE_URL,
    DEFAULT_HISTORY_PAIRS,
    DEFAULT_MODEL,
    ChatSession,
    ToolRun,
)
from minimind_course.client.history import PromptTooLongError, tokenizer_counter

HELP = """commands:
  /reset        forget the conversation (the system prompt stays)
  /history      show the conversation; * marks the pairs the next question would carry
  /save FILE    save the conversation as JSON (OpenAI messages)
  /load FILE    load a conversation saved with /save
  /quit         leave (Ctrl-D works too)
  /help         this text
a line starting with // sends the rest as a message that starts with /"""

DIM, RESET = "\033[2m", "\033[0m"


class ChatError(Exception):
    """An error worth one line on stderr; it ends the run when piped, or when ``fatal`` (the server is gone)."""

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m minimind_course.chat",
        description="Chat with an OpenAI-compatible server (ours or vLLM), keeping a window of the history.",
        epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help="server root ending in /v1 (%(default)s)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="served model name (%(default)s)")
    parser.add_argument("--api-key", default=DEFAULT_API_KEY, help="API key, if the server wants one")
    parser.add_argument(
        "--history", type=non_negative, default=DEFAULT_HISTORY_PAIRS, metavar="N",
        help="question/answer pairs sent with each question, 0 for none (%(default)s)",
    )
    parser.add_argument(
        "--max-history-tokens", type=positive, default=None, metavar="T",
        help="token budget of the whole prompt; the oldest pairs are dropped to fit (default: no budget)",
    )
    parser.add_argument(
        "--tokenizer", default=None, metavar="PATH",
        help="count the budget exactly with this local tokenizer folder (default: an estimate)",
    )
    parser.add_argument("--system", default=None, metavar="TEXT", help="system prompt, always sent first")
    parser.add_argument("--no-stream", action="store_true", help="wait for whole answers instead of streaming")
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the server's)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--max-tokens", type=positive, default=None, help="answer length limit in tokens")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for an answer (%(default)s)")
    return parser


def non_negative(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def describe(error: openai.OpenAIError) -> str:
    """One line for an SDK error: the server's own message when it sent an OpenAI error body."""
    if isinstance(error, openai.APIStatusError):
        body = error.body
        message = body.get("message") if isinstance(body, dict) else None
        return f"server said {error.status_code}: {message or error.message}"
    return str(error)


def session_from_args(args: argparse.Namespace) -> ChatSession:
    """A ChatSession configured from the options; checks that the server is up and serves the model."""
    options = {
        name: value
        for name, value in (("temperature", args.temperature), ("top_p", args.top_p), ("max_tokens", args.max_tokens))
        if value is not None
    }
    session = ChatSession(
        args.base_url,
        args.model,
        args.api_key,
        timeout=args.timeout,
        max_retries=1,
        system=args.system,
        max_pairs=args.history,
        max_history_tokens=args.max_history_tokens,
        **options,
    )
    if args.tokenizer:
        session.count_tokens = tokenizer_counter(load_tokenizer(args.tokenizer))
    try:
        served = [model.id for model in session.client.models.list()]
    except openai.APIConnectionError as error:
        raise ChatError(f"cannot reach a server at {args.base_url} ({error}); is it running?") from None
    except openai.OpenAIError as error:
        raise ChatError(f"{args.base_url}: {describe(error)}") from None
    if args.model not in served:
        raise ChatError(f"model {args.model!r} is not served at {args.base_url}; it serves: {', '.join(served)}")
    return session


def load_tokenizer(path: str):
    """A local transformers tokenizer for exact budget counting."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ChatError(f"cannot load a tokenizer from {path}: {error}") from None


def read_lines(interactive: bool) -> Iterator[str]:
    """User lines: from a prompt when interactive (with line editing), else from stdin as it arrives."""
    if not interactive:
        for line in sys.stdin:
            yield line.rstrip("\r\n")
        return
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            yield input("you> ")
        except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line, like Python's REPL
            print(file=sys.stderr)
        except EOFError:
            print(file=sys.stderr)
            return


def show_history(session: ChatSession, out: TextIO) -> None:
    """Print every stored pair; * marks those the next question would carry."""
    if not session.pairs:
        print("(no history yet)", file=out)
        return
    first_carried = len(session.pairs) - session.carried_pairs()
    if session.system:
        print(f"  system: {session.system}", file=out)
    for number, pair in enumerate(session.pairs, 1):
        mark = "*" if number > first_carried else " "
        print(f"{mark} {number}. user: {pair.question}", file=out)
        print(f"     assistant: {pair.answer}", file=out)


def run_command(line: str, session: ChatSession, out: TextIO) -> bool:
    """Carry out a /command; False means quit."""
    name, _, argument = line.partition(" ")
    argument = argument.strip()
    if name in ("/quit", "/exit"):
        return False
    if name == "/help":
        print(HELP, file=out)
    elif name == "/reset":
        session.reset()
        print("history cleared", file=sys.stderr)
    elif name == "/history":
        show_history(session, out)
    elif name in ("/save", "/load"):
        if not argument:
            raise ChatError(f"usage: {name} FILE")
        try:
            if name == "/save":
                session.save(argument)
            else:
                session.load(argument)
        except (OSError, ValueError) as error:
            raise ChatError(f"{name} {argument}: {error}") from None
        done = "saved" if name == "/save" else "loaded"
        print(f"{done} {len(session.pairs)} pairs {'to' if name == '/save' else 'from'} {argument}", file=sys.stderr)
    else:
        raise ChatError(f"unknown command {name}; /help lists them")
    return True


def show_tool_run(run: ToolRun, interactive: bool, out: TextIO) -> None:
    """One line per tool call the session ran: ``[tool] name(arguments) -> result`` (dimmed when interactive)."""
    line = f"[tool] {run.name}({run.arguments}) -> {run.result}"
    print(DIM + line + RESET if interactive else line, file=out, flush=True)


def answer(question: str, session: ChatSession, stream: bool, interactive: bool, out: TextIO) -> None:
    """Ask one question and print the answer (reasoning dimmed, only when interactive; tool calls as they run)."""
    if interactive:
        print(f"{session.model}> ", end="", file=out, flush=True)
    try:
        if stream:
            for delta in session.stream(question):
                if delta.tool_run is not None:
                    show_tool_run(delta.tool_run, interactive, out)
                if delta.reasoning_content and interactive:
                    print(DIM + delta.reasoning_content + RESET, end="", file=out, flush=True)
                print(delta.content, end="", file=out, flush=True)
            print(file=out, flush=True)
        else:
            reply = session.ask(question, stream=False)
            for run in reply.tool_runs:
                show_tool_run(run, interactive, out)
            if reply.reasoning_content and interactive:
                print(DIM + reply.reasoning_content + RESET, file=out)
            print(reply.content, file=out, flush=True)
    except PromptTooLongError as error:
        raise ChatError(str(error)) from None
    except openai.APIConnectionError as error:
        print(file=out, flush=True)
        raise ChatError(f"lost the server at {session.client.base_url} ({error})", fatal=True) from None
    except openai.OpenAIError as error:
        print(file=out, flush=True)
        raise ChatError(describe(error)) from None


def fatal(message: str) -> int:
    """Print one error line on stderr and return the exit status."""
    print(f"error: {message}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run the chat; returns the exit status."""
    args = build_parser().parse_args(argv)
    interactive = sys.stdin.isatty()
    for stream in (sys.stdin, sys.stdout):
        if not stream.isatty():  # pipes and files are UTF-8 whatever the platform's locale says
            stream.reconfigure(encoding="utf-8")
    out = sys.stdout
    try:
        session = session_from_args(args)
    except ChatError as error:
        return fatal(str(error))
    if interactive:
        budget = f", budget {args.max_history_tokens} tokens" if args.max_history_tokens else ""
        print(f"{args.model} at {args.base_url}; history {args.history} pairs{budget}; /help for commands",
              file=sys.stderr)
    for line in read_lines(interactive):
        text = line.strip()
        if not text:
            continue
        try:
            if text.startswith("/") and not text.startswith("//"):
                if not run_command(text, session, out):
                    break
            else:
                answer(text[1:] if text.startswith("//") else text, session, not args.no_stream, interactive, out)
        except ChatError as error:
            status = fatal(str(error))
            if error.fatal or not interactive:
                return status
        except KeyboardInterrupt:
            print("\n[interrupted; the answer was not kept]", file=sys.stderr)
            if not interactive:
                return 130
    return 0
