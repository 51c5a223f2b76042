"""Draw the course's mechanism figures as SVG files next to this script.

    python notebooks/figures/make_figures.py            # rewrite every figure here
    python notebooks/figures/make_figures.py OUT_DIR    # write them into OUT_DIR instead (the test does this)

One function per figure, matplotlib only (boxes, arrows, text). Text is drawn as paths, the SVG hash salt is fixed
and the date left out, so running the script again gives byte-identical files (``tests/test_notebook_structure.py``
checks it). Figures of measurements are drawn by the notebooks' own code cells.

| figure | for | drawn from |
|---|---|---|
| ``request_path.svg`` | notebook 02 | ``serving/app.py``, ``serving/middleware.py``, ``serving/responses.py``, ``engine/`` |
| ``sse_chunk_sequence.svg`` | notebook 03 | ``serving/responses.py`` (``sse_stream``, ``ChatRenderer``) |
| ``tool_round_trip.svg`` | notebook 07 | ``serving/tool_parser.py``, ``client/session.py``, the chat template |
| ``history_window.svg`` | notebook 06 | ``client/history.py`` (``build_window``) |
| ``minimind_block.svg`` | notebook 01 | ``model/minimind.py``, ``assets/minimind-tiny/config.json`` |
| ``plan_a_plan_b.svg`` | notebook 05 | ``serve.py``, ``serving/vllm_launcher.py`` |
| ``export_mapping.svg`` | notebook 05 | ``model/export.py`` |
| ``ecosystem_map.svg`` | notebook 08 | ``serving/app.py`` (routes), ``ecosystem.py``, docs/clients.md |
| ``cors_preflight.svg`` | notebook 08 | ``serving/middleware.py`` (CORSMiddleware), vLLM's ``--allowed-*`` |
| ``roofline.svg`` | notebook 09 | ``bench/decode_bound.py`` (a schematic, no measured numbers) |
| ``paged_kv_cache.svg`` | notebook 04 | ``engine/kv_cache.py``, ``engine/scheduler.py`` (``_preempt``) |
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("svg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402

HERE = Path(__file__).resolve().parent

# One palette for every figure: who a box belongs to.
OURS = "#2b6cb0"  # our server (FastAPI app, event loop)
VLLM = "#6b46c1"  # real vLLM (kept for figures that compare the two)
CLIENT = "#2f855a"  # the client: openai SDK, curl, ChatSession
MODEL = "#c05621"  # the model and the engine around it
ERROR = "#c53030"  # errors in OpenAI's envelope
MUTED = "#a0aec0"  # dropped or inactive
INK = "#1a202c"  # text
TINT = {OURS: "#ebf4ff", VLLM: "#f3ebff", CLIENT: "#e6f6ec", MODEL: "#fdf0e6", ERROR: "#fdeaea", MUTED: "#f1f3f5"}

WIDTH_IN = 10.0  # every figure is 10 inches wide: legible at notebook width
MONO = "DejaVu Sans Mono"  # shipped with matplotlib, like DejaVu Sans: the same glyphs on every machine

plt.rcParams.update({
    "svg.fonttype": "path",  # text as paths: renders the same in JupyterLab, on GitHub, without the fonts
    "svg.hashsalt": "minimind-course-figures",  # fixed ids, so the files do not change from run to run
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
})


# ---- drawing helpers --------------------------------------------------------------------------------------
def canvas(height_in: float) -> tuple[plt.Figure, plt.Axes]:
    """A white figure whose data units are inches: (0, 0) bottom left, (WIDTH_IN, height_in) top right."""
    fig = plt.figure(figsize=(WIDTH_IN, height_in))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, WIDTH_IN)
    ax.set_ylim(0, height_in)
    ax.axis("off")
    return fig, ax


def box(ax, x, y, w, h, text="", color=OURS, *, fill=None, size=8.5, mono=False, weight="normal", dashed=False,
        align="center", radius=0.06, lw=1.2):
    """A rounded box with its lower left corner at (x, y) and centred (or left-aligned) text."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=f"round,pad=0,rounding_size={radius}",
                                facecolor=TINT.get(color, "white") if fill is None else fill, edgecolor=color,
                                linewidth=lw, linestyle="--" if dashed else "-"))
    if text:
        tx = x + w / 2 if align == "center" else x + 0.1
        ax.text(tx, y + h / 2, text, ha=align, va="center", fontsize=size, color=INK, weight=weight,
                family=MONO if mono else None, linespacing=1.3)


def arrow(ax, start, end, color=INK, *, lw=1.2, dashed=False, style="-|>", rad=0.0, head=9):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=head, color=color, linewidth=lw,
                                 linestyle="--" if dashed else "-", connectionstyle=f"arc3,rad={rad}",
                                 shrinkA=0, shrinkB=0))


def label(ax, x, y, text, *, size=8.5, color=INK, ha="center", va="center", mono=False, weight="normal",
          style="normal", rotation=0):
    ax.text(x, y, text, ha=ha, va=va, fontsize=size, color=color, family=MONO if mono else None, weight=weight,
            style=style, rotation=rotation, linespacing=1.3)


def badge(ax, x, y, number, color=INK):
    """A numbered circle: the step number the prose refers to."""
    ax.add_patch(plt.Circle((x, y), 0.13, facecolor=color, edgecolor="none"))
    ax.text(x, y, str(number), ha="center", va="center", fontsize=8, color="white", weight="bold")


def save(fig: plt.Figure, out_dir: Path, name: str) -> Path:
    path = out_dir / name
    fig.savefig(path, format="svg", metadata={"Date": None})
    plt.close(fig)
    return path


def path_arrow(ax, points, color=INK, *, lw=1.2, dashed=False):
    """An arrow along a polyline: straight segments, the head on the last one."""
    style = "--" if dashed else "-"
    for a, b in zip(points[:-2], points[1:-1]):
        ax.plot([a[0], b[0]], [a[1], b[1]], color=color, linewidth=lw, linestyle=style, solid_capstyle="butt")
    arrow(ax, points[-2], points[-1], color, lw=lw, dashed=dashed)


def lane(ax, x, y, w, h, name, color):
    """A tinted band with its name in the top left corner: who runs the boxes inside."""
    ax.add_patch(Rectangle((x, y), w, h, facecolor=TINT[color], edgecolor="none", alpha=0.6))
    if name:
        label(ax, x + 0.1, y + h - 0.15, name, ha="left", size=8.5, color=color, weight="bold")


# ---- the figures ------------------------------------------------------------------------------------------
def step_row(ax, row, y, h):
    """Boxes ``(x, width, text, status)`` left to right at height ``y``, joined by arrows, each status in red."""
    for i, (x, w, text, err) in enumerate(row):
        box(ax, x, y, w, h, text, OURS, size=7.5)
        if i:
            arrow(ax, (row[i - 1][0] + row[i - 1][1], y + h / 2), (x, y + h / 2))
        if err:
            label(ax, x + w - 0.05, y - 0.12, err, ha="right", size=7.5, color=ERROR, weight="bold")


def request_path(out_dir: Path) -> Path:
    """Notebook 02: one non-streamed chat request through our server and back (names from serving/ and engine/)."""
    fig, ax = canvas(6.55)
    lane(ax, 0.05, 0.1, 1.9, 6.35, "client", CLIENT)
    lane(ax, 2.0, 2.4, 7.95, 4.05, "our server: FastAPI on one asyncio event loop", OURS)
    lane(ax, 2.0, 0.1, 7.95, 2.2, "", MODEL)
    label(ax, 3.75, 2.15, "engine: one worker thread (engine/engine.py)", ha="left", size=8.5, color=MODEL,
          weight="bold")

    # the client: sends, and gets either the answer or an error in OpenAI's shape
    box(ax, 0.15, 4.95, 1.7, 0.8, "openai SDK,\ncurl, httpx", CLIENT)
    box(ax, 0.15, 3.45, 1.7, 0.85, '4xx error\n{"error": {message,\ntype, param, code}}', ERROR, size=7.5)
    box(ax, 0.15, 2.5, 1.7, 0.75, "200 OK\nchat.completion:\nchoices, usage", CLIENT, size=8)

    # 1: middleware, then FastAPI parses the body into the request model
    row_a = [(2.15, 1.45, "CORSMiddleware\n(answers browser\npreflights)", None),
             (3.75, 1.85, "BodySizeLimitMiddleware\nbody over 2 MiB", "413"),
             (5.75, 1.6, "ApiKeyMiddleware\nonly with --api-key", "401"),
             (7.5, 2.3, "ChatCompletionRequest\npydantic validation\n(serving/protocol.py)", "400 / 415")]
    badge(ax, 2.28, 6.0, 1, OURS)
    label(ax, 2.48, 6.0, "POST /v1/chat/completions: middleware (serving/middleware.py), then the body is "
          "validated", ha="left", size=8)
    arrow(ax, (1.85, 5.35), (2.15, 5.35))
    ya, ha_ = 4.95, 0.8
    step_row(ax, row_a, ya, ha_)

    # 2: the route turns messages into token ids and queues them
    row_b = [(2.15, 1.3, "check_model\nunknown name", "404"),
             (3.6, 2.1, "engine.chat_prompt\nchat template renders\nmessages → prompt text", "400"),
             (5.85, 1.55, "engine.encode\ntokenizer\n→ prompt_ids", None),
             (7.55, 2.25, "completion_budget\n(prompt + max_tokens)\nengine.submit → queue", "400 / 429")]
    yb, hb = 3.4, 0.85
    badge(ax, 2.28, 4.55, 2, OURS)
    label(ax, 2.48, 4.55, "route chat_completions() (serving/app.py)", ha="left", size=8)
    path_arrow(ax, [(8.65, ya), (8.65, 4.72), (6.1, 4.72), (6.1, 4.4), (2.8, 4.4), (2.8, yb + hb)])
    step_row(ax, row_b, yb, hb)
    # every 4xx leaves through add_error_handlers, in OpenAI's envelope (FastAPI's own 422 becomes 400)
    arrow(ax, (2.15, yb + hb / 2), (1.85, 3.85), ERROR, dashed=True, lw=1)
    path_arrow(ax, [(2.55, ya), (2.55, 4.72), (1.6, 4.72), (1.6, 4.3)], ERROR, dashed=True, lw=1)

    # 3: the engine's step loop; every running request shares each forward pass
    engine = [(7.75, 2.05, "Scheduler.schedule()\nseats and KV-cache\nblocks (scheduler.py)"),
              (5.45, 2.05, "ModelRunner.forward()\none batched pass\n(runner.py)"),
              (3.45, 1.75, "sample next token\nSamplingParams\n(sampling.py)"),
              (2.15, 1.1, "detokenize\n+ stop\nstrings")]
    ye, he = 0.75, 0.85
    badge(ax, 7.45, 1.98, 3, MODEL)
    label(ax, 8.55, 1.98, "queued (FIFO)", ha="right", size=8, color=MODEL)
    arrow(ax, (8.75, yb), (8.75, ye + he))
    for i, (x, w, text) in enumerate(engine):
        box(ax, x, ye, w, he, text, MODEL, size=7.5)
        if i:
            arrow(ax, (engine[i - 1][0], ye + he / 2), (x + w, ye + he / 2))
    path_arrow(ax, [(2.7, ye), (2.7, 0.45), (8.8, 0.45), (8.8, ye)], MODEL, dashed=True)
    label(ax, 5.75, 0.3, "next step: one token per running request, until stop or max_tokens; "
          "new requests join at the next step", size=7.5, color=MODEL, style="italic")

    # 4: the result, in OpenAI's shape, back to the client
    badge(ax, 8.25, 2.83, 4, OURS)
    box(ax, 2.5, 2.55, 5.5, 0.57, "chat_completion() builds ChatCompletion(id, choices[].message,\n"
        "choices[].finish_reason, usage)   (serving/responses.py)", OURS, size=7.5)
    arrow(ax, (2.7, ye + he), (2.7, 2.55), MODEL)
    label(ax, 2.8, 2.0, "GenerationResult", ha="left", size=7.5, color=MODEL)
    arrow(ax, (2.5, 2.85), (1.85, 2.85), OURS)
    return save(fig, out_dir, "request_path.svg")


def sse_chunk_sequence(out_dir: Path) -> Path:
    """Notebook 03: the events of one streamed chat answer, in the order sse_stream and ChatRenderer write them."""
    fig, ax = canvas(6.4)
    client_x, server_x, axis_x = 1.55, 8.45, 0.55
    top, bottom = 5.75, 0.85
    for x, name, color in [(client_x, "client", CLIENT), (server_x, "our server", OURS)]:
        box(ax, x - 0.6, top, 1.2, 0.38, name, color, weight="bold")
        ax.plot([x, x], [bottom, top], color=color, linewidth=1.2, linestyle=":")
    # the time axis on the left, downwards
    arrow(ax, (axis_x, top + 0.2), (axis_x, bottom), MUTED, lw=1.2)
    label(ax, axis_x - 0.1, top + 0.35, "time", ha="left", size=8, color="#4a5568")

    rest = '"finish_reason": null}]}'
    content = [("Paris", "prefill + 1st token"), (" is", "decode step"), (" the", "decode step"),
               (" capital", "decode step"), (".", "last token")]
    events = [  # (y, frame text, colour, note on the server side)
        (5.3, "POST /v1/chat/completions  {..., \"stream\": true, \"stream_options\": {\"include_usage\": true}}",
         CLIENT, "request queued"),
        (4.85, 'data: {…, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, ' + rest,
         OURS, "sent at once"),
        *[(3.95 - 0.45 * i, 'data: {…, "choices": [{"index": 0, "delta": {"content": "%s"}, ' % piece + rest,
           MODEL, note) for i, (piece, note) in enumerate(content)],
        (1.75, 'data: {…, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}', OURS, "same step"),
        (1.4, 'data: {…, "choices": [], "usage": {"prompt_tokens": …, "completion_tokens": …, '
         '"total_tokens": …}}', OURS, "include_usage only"),
        (1.05, "data: [DONE]", OURS, "end of stream"),
    ]
    for i, (y, text, color, note) in enumerate(events):
        if i == 0:
            arrow(ax, (client_x, y), (server_x, y), CLIENT, lw=1.4)
        else:
            arrow(ax, (server_x, y), (client_x, y), color, lw=1.4)
        label(ax, client_x + 0.12, y + 0.13, text, ha="left", size=7.3, mono=True)
        label(ax, server_x + 0.12, y, note, ha="left", size=7.5, color="#4a5568", style="italic")
        ax.plot([axis_x - 0.06, axis_x + 0.06], [y, y], color="#4a5568", linewidth=1)
    label(ax, axis_x - 0.1, 0.6, r"each event is one data: line and a blank line (\n\n);  "
          "{…} = the same \"id\", \"object\": \"chat.completion.chunk\", \"created\", \"model\" in every chunk",
          ha="left", size=7.3, color="#4a5568")
    label(ax, axis_x - 0.1, 0.35, "with include_usage every other chunk also carries \"usage\": null; "
          "a slow reader gets merged steps (fewer, longer chunks), never different text", ha="left", size=7.3,
          color="#4a5568")

    # what the time axis measures: TTFT to the first text, then the gaps between tokens
    def bracket(y1, y2, text, color):
        x = axis_x + 0.18
        ax.plot([x + 0.06, x, x, x + 0.06], [y1, y1, y2, y2], color=color, linewidth=1.3)
        label(ax, x + 0.1, (y1 + y2) / 2, text, ha="left", size=7.5, color=color, weight="bold")

    bracket(5.3, 3.95, "TTFT:\nqueue\n+ prefill", MODEL)
    for i in range(len(content) - 1):
        bracket(3.95 - 0.45 * i, 3.5 - 0.45 * i, "ITL", MODEL)
    ax.add_patch(Rectangle((server_x - 0.05, 1.75), 0.1, 3.55, facecolor=TINT[MODEL], edgecolor=MODEL, lw=0.8))
    return save(fig, out_dir, "sse_chunk_sequence.svg")


def tool_round_trip(out_dir: Path) -> Path:
    """Notebook 07: one tool call, from the request with ``tools`` to the answer that uses the result."""
    fig, ax = canvas(6.9)
    client_x, server_x = 1.2, 8.9
    top, bottom = 6.35, 0.75
    box(ax, client_x - 1.05, top, 2.1, 0.42, "client: ChatSession\n(client/session.py)", CLIENT, size=8)
    box(ax, server_x - 0.95, top, 1.9, 0.42, "our server\n+ the model", OURS, size=8)
    for x, color in [(client_x, CLIENT), (server_x, OURS)]:
        ax.plot([x, x], [bottom, top], color=color, linewidth=1.2, linestyle=":", zorder=0)

    def message(y, lines, color, number, leftwards):
        start, end = (server_x, client_x) if leftwards else (client_x, server_x)
        arrow(ax, (start, y), (end, y), color, lw=1.4)
        badge(ax, 0.75, y + 0.13 + 0.17 * (len(lines) - 1), number, color)
        for i, line in enumerate(lines):
            label(ax, client_x + 0.3, y + 0.13 + 0.17 * (len(lines) - 1 - i), line, ha="left", size=7.3, mono=True)

    message(5.75, ['POST /v1/chat/completions  {"messages": [{"role": "user", "content": "Weather in Paris?"}],',
                   '  "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {…}}}]}'],
            CLIENT, 1, False)
    box(ax, 2.6, 4.45, 6.1, 0.85, "", OURS)
    badge(ax, 2.8, 5.1, 2, OURS)
    label(ax, 3.0, 5.1, "the chat template writes the tools into the system prompt (# Tools … <tools>{…}</tools>);",
          ha="left", size=7.5)
    label(ax, 3.0, 4.88, "the model answers with a call in its text:", ha="left", size=7.5)
    label(ax, 2.75, 4.62, '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
          ha="left", size=7.3, mono=True, color=MODEL)
    message(3.75, ['"message": {"role": "assistant", "content": null, "tool_calls": [{"id": "call_…",',
                   '  "type": "function", "function": {"name": "get_weather", "arguments": "{\\"city\\": '
                   '\\"Paris\\"}"}}]}',
                   '"finish_reason": "tool_calls"      (ToolCallParser, serving/tool_parser.py)'],
            OURS, 3, True)
    box(ax, 0.2, 2.75, 6.2, 0.5, "", CLIENT)
    badge(ax, 0.45, 3.0, 4, CLIENT)
    label(ax, 0.65, 3.0, 'the client runs the registered function itself (Tool.run):  get_weather(city="Paris") '
          '→ "18°C, sunny"', ha="left", size=7.5)
    message(1.95, ['{"messages": [the user message, the assistant message with tool_calls,',
                   '  {"role": "tool", "tool_call_id": "call_…", "content": "18°C, sunny"}], "tools": [...]}',
                   'the template shows the result to the model as <tool_response>18°C, sunny</tool_response>'],
            CLIENT, 5, False)
    message(1.0, ['"message": {"role": "assistant", "content": "It is 18°C and sunny in Paris."},',
                  '"finish_reason": "stop"'], MODEL, 6, True)
    label(ax, 0.2, 0.35, "ChatSession repeats 3-5 while the model calls tools (at most max_tool_rounds); the pair it "
          "stores keeps the tool steps. A call forced by name answers with \"finish_reason\": \"stop\".",
          ha="left", size=7.3, color="#4a5568")
    return save(fig, out_dir, "tool_round_trip.svg")


def history_window(out_dir: Path) -> Path:
    """Notebook 06: which messages build_window sends under a token budget (an example conversation)."""
    fig, ax = canvas(5.6)
    max_model_len, answer = 1024, 256
    budget = max_model_len - answer
    system_tokens, question_tokens = 40, 35  # the question includes the template's generation prompt
    pairs = [180, 100, 210, 190, 220, 170]  # tokens of each whole pair, oldest first
    kept, used = 0, system_tokens + question_tokens
    while kept < len(pairs) and used + pairs[-kept - 1] <= budget:  # build_window: grow from the newest backwards
        used += pairs[-kept - 1]
        kept += 1
    first_kept = len(pairs) - kept

    label(ax, 0.2, 5.3, "the whole conversation (ChatSession.pairs), oldest at the top", ha="left", size=8.5,
          weight="bold")
    row_h, gap, y = 0.4, 0.08, 4.75

    def sent(row_y, dropped=False):
        label(ax, 5.45, row_y + row_h / 2, "dropped" if dropped else "sent", ha="left", size=8,
              color=ERROR if dropped else CLIENT, weight="bold")

    box(ax, 0.2, y, 4.6, row_h, "system prompt: pinned, always sent", CLIENT, size=8)
    label(ax, 4.95, y + row_h / 2, f"{system_tokens}", ha="left", size=8)
    sent(y)
    for i, tokens in enumerate(pairs):
        y -= row_h + gap
        dropped = i < first_kept
        color = MUTED if dropped else CLIENT
        box(ax, 0.2, y, 0.65, row_h, f"pair {i + 1}", color, size=8, fill="white" if dropped else None)
        box(ax, 0.95, y, 1.85, row_h, f"user: question {i + 1}", color, size=8, fill=TINT[MUTED] if dropped else None)
        box(ax, 2.9, y, 1.9, row_h, f"assistant: answer {i + 1}", color, size=8,
            fill=TINT[MUTED] if dropped else None)
        label(ax, 4.95, y + row_h / 2, f"{tokens}", ha="left", size=8, color=MUTED if dropped else INK)
        sent(y, dropped)
    y -= row_h + gap
    box(ax, 0.2, y, 4.6, row_h, "user: the current question (+ generation prompt): always sent", CLIENT, size=8)
    label(ax, 4.95, y + row_h / 2, f"{question_tokens}", ha="left", size=8)
    sent(y)
    label(ax, 4.95, 5.3, "tokens", ha="left", size=8, weight="bold")

    label(ax, 0.2, 0.92, f"build_window grows the window from the newest pair backwards while the whole prompt "
          f"fits the budget ({used} ≤ {budget} here);\npair {first_kept} does not fit, so it and everything older is dropped "
          f"(pair {first_kept - 1} is smaller, but a gap is never skipped).", ha="left", va="top", size=7.5)
    label(ax, 0.2, 0.38, "a pair is never split (its tool steps travel with it); if the system prompt and the "
          "question alone exceed the budget: PromptTooLongError", ha="left", size=7.5, color="#4a5568")

    # the context: the prompt's budget below, the answer's reserve on top
    bx, bw, b0, scale = 7.75, 0.55, 1.3, 3.75 / max_model_len
    label(ax, bx + bw / 2, 5.3, f"context: max_model_len = {max_model_len}", size=8.5, weight="bold")
    segments = [(system_tokens, CLIENT, "system")]
    segments += [(pairs[i], CLIENT, f"pair {i + 1}") for i in range(first_kept, len(pairs))]
    segments += [(question_tokens, CLIENT, "question"), (budget - used, None, f"free: {budget - used}")]
    y = b0
    for tokens, color, name in segments:
        h = tokens * scale
        ax.add_patch(Rectangle((bx, y), bw, h, facecolor=TINT[color] if color else "white",
                               edgecolor=color or MUTED, linewidth=1))
        label(ax, bx + bw + 0.08, y + h / 2, name, ha="left", size=7.5, color=INK if color else "#4a5568")
        y += h
    ax.add_patch(Rectangle((bx, y), bw, answer * scale, facecolor=TINT[MODEL], edgecolor=MODEL, hatch="///",
                           linewidth=1))
    label(ax, bx + bw + 0.08, y + answer * scale / 2, f"reserved for the\nanswer: max_tokens\n= {answer}",
          ha="left", size=7.5, color=MODEL)
    brace_x = bx - 0.12
    ax.plot([brace_x + 0.06, brace_x, brace_x, brace_x + 0.06], [b0, b0, b0 + budget * scale, b0 + budget * scale],
            color=OURS, linewidth=1.3)
    label(ax, brace_x - 0.08, b0 + budget * scale / 2,
          f"prompt budget\nmax_history_tokens\n= max_model_len\n− max_tokens\n= {budget}", ha="right", size=7.5,
          color=OURS, weight="bold")
    return save(fig, out_dir, "history_window.svg")


def paged_kv_cache(out_dir: Path) -> Path:
    """Notebook 04: block tables, the free list and recompute preemption (engine/kv_cache.py, scheduler.py)."""
    fig, ax = canvas(5.7)
    bs = 16  # DEFAULT_BLOCK_SIZE
    # a state the code reaches: A (30 tokens) takes blocks 0 1, B (20) 2 3, C (10) 4; A grows past 32: 5;
    # B finishes (free() returns 3 2); C grows past 16: pop() hands out 2
    tables = {"A": ([0, 1, 5], 44, CLIENT), "C": ([4, 2], 18, MODEL)}
    free = [7, 6, 3]
    owner = {b: name for name, (table, _, _) in tables.items() for b in table}
    label(ax, 0.2, 5.45, "the paged KV cache: per layer one tensor of (num_blocks + 1) × 16 token slots; "
          "a sequence owns blocks, not a region", ha="left", size=8.5, weight="bold")

    # block tables on the left
    label(ax, 0.2, 5.1, "block table per sequence (Sequence.block_table)", ha="left", size=8, color=OURS,
          weight="bold")
    ys = {"A": 4.35, "C": 3.6}
    for name, (table, tokens, color) in tables.items():
        y = ys[name]
        label(ax, 0.2, y + 0.2, f"seq {name}\n{tokens} tokens", ha="left", size=7.5)
        for i, block in enumerate(table):
            box(ax, 1.15 + 0.55 * i, y, 0.5, 0.4, str(block), color, mono=True, radius=0.03)
            label(ax, 1.4 + 0.55 * i, y + 0.5, f"[{i}]", size=6.5, color="#4a5568", mono=True)
    # the store in the middle-right: blocks 0..7 and the scratch block
    sx, sy, bw, bh = 3.55, 4.05, 0.62, 0.62
    label(ax, sx, 5.1, "KVCache.keys[layer] / values[layer]: blocks of 16 slots", ha="left", size=8,
          color=OURS, weight="bold")
    for b in range(9):
        x = sx + b * (bw + 0.07)
        if b == 8:
            ax.add_patch(Rectangle((x, sy), bw, bh, facecolor=TINT[MUTED], edgecolor=MUTED, hatch="///", lw=1))
            label(ax, x + bw / 2, sy - 0.35, "scratch:\npadding", size=6.5, color="#4a5568")
            label(ax, x + bw / 2, sy + bh / 2, "8", mono=True, size=8)
            continue
        name = owner.get(b)
        color = tables[name][2] if name else MUTED
        box(ax, x, sy, bw, bh, f"{b}\n{name or 'free'}", color, fill=None if name else "white", size=7.5,
            radius=0.03)
        label(ax, x + bw / 2, sy - 0.12, f"{b * bs}–{b * bs + bs - 1}", size=6, color="#4a5568", mono=True)
    # token 37 of A: block_table[37 // 16] = block 5, slot 5 × 16 + 37 % 16
    arrow(ax, (1.15 + 0.55 * 2 + 0.5, 4.55), (sx + 5 * (bw + 0.07) + bw / 2, sy + bh), CLIENT, rad=-0.14)
    label(ax, 0.2, 3.15, "token t of a sequence lives in slot  block_table[t // 16] × 16 + t % 16", ha="left",
          size=7.5, mono=True)
    label(ax, 0.2, 2.92, "e.g. A's token 37:  block_table[2] = 5  →  slot 5 × 16 + 5 = 85", ha="left", size=7.5,
          mono=True, color=CLIENT)
    # the free list
    fx, fy = 6.2, 2.8
    label(ax, fx, 3.4, "free list (KVCache.free_blocks)", ha="left", size=8, color=OURS, weight="bold")
    for i, b in enumerate(free):
        box(ax, fx + 0.5 * i, fy, 0.45, 0.4, str(b), MUTED, fill="white", mono=True, radius=0.03)
    label(ax, fx + 1.55, fy + 0.2, "← pop(): next block handed out\n    (zeroed first)", ha="left", size=7,
          color="#4a5568")
    label(ax, 0.2, 2.5, "allocate(): a sequence takes a block only when it crosses a 16-token boundary; free(): "
          "a finished or preempted one gives all its blocks back at once", ha="left", size=7.5, color="#4a5568")

    # recompute preemption, three stages
    ax.plot([0.2, 9.8], [2.3, 2.3], color=MUTED, lw=0.8)
    label(ax, 0.2, 2.08, "when the blocks run out: recompute preemption (Scheduler.schedule, _preempt)",
          ha="left", size=8.5, weight="bold")
    stages = [
        (1, "decode step: A's next token crosses\na block boundary, but the free list\nis empty: allocate() "
            "returns False", OURS),
        (2, "preempt the newest running sequence\n(running[-1], here D): free(D's blocks),\n"
            "D.num_computed = 0, D → front of\nthe preempted queue; A gets a block", ERROR),
        (3, "a later step, blocks free again:\nD is resumed first and its tokens\n(prompt + answer so far) are "
            "prefilled\nagain; no new request is admitted\nwhile one waits (can_admit)", MODEL),
    ]
    x0, w, gap = 0.2, 2.95, 0.3
    for i, (n, text, color) in enumerate(stages):
        x = x0 + i * (w + gap)
        box(ax, x, 0.15, w, 1.6, "", color)
        badge(ax, x + 0.22, 1.53, n, color)
        label(ax, x + 0.45, 0.9, text, ha="left", size=7.5)
        if i:
            arrow(ax, (x - gap, 0.95), (x, 0.95))
    return save(fig, out_dir, "paged_kv_cache.svg")


def minimind_block(out_dir: Path) -> Path:
    """Notebook 01: the model and one decoder block, as model/minimind.py computes them (bundled config values)."""
    fig, ax = canvas(5.0)
    cfg = {"hidden": 256, "heads": 4, "kv_heads": 2, "head_dim": 64, "ffn": 704, "layers": 4, "vocab": 2786}
    # the whole model, bottom to top, on the left
    lane(ax, 0.05, 0.1, 2.2, 4.8, "MiniMindForCausalLM", MODEL)
    stack = [(0.35, "input_ids", CLIENT), (1.05, f"embed_tokens\n{cfg['vocab']} × {cfg['hidden']}", MODEL),
             (1.9, f"Block × {cfg['layers']}\n(num_hidden_layers)", OURS),
             (2.75, "norm (RMSNorm)", MODEL), (3.45, "lm_head (tied to\nembed_tokens)", MODEL),
             (4.15, f"logits: {cfg['vocab']}\nper position", CLIENT)]
    for i, (y, text, color) in enumerate(stack):
        box(ax, 0.25, y, 1.8, 0.5, text, color, size=7.5, weight="bold" if color == OURS else "normal")
        if i:
            arrow(ax, (1.15, stack[i - 1][0] + 0.5), (1.15, y))
    # the block on the right, two sublayers, each x + f(norm(x))
    lane(ax, 2.4, 0.1, 7.55, 4.8, "Block (pre-norm): x = x + self_attn(input_layernorm(x)); "
         "x = x + mlp(post_attention_layernorm(x))", OURS)

    def row(y, steps, residual_note):
        """Boxes (x, w, text, colour) at height y, joined left to right, with the residual stream above them."""
        h = 0.95
        for i, (x, w, text, color) in enumerate(steps):
            box(ax, x, y, w, h, text, color, size=7.3)
            if i:
                arrow(ax, (steps[i - 1][0] + steps[i - 1][1], y + h / 2), (x, y + h / 2))
        end = steps[-1][0] + steps[-1][1]
        ax.add_patch(plt.Circle((end + 0.3, y + h / 2), 0.13, facecolor="white", edgecolor=INK, lw=1.2))
        label(ax, end + 0.3, y + h / 2, "+", size=10)
        arrow(ax, (end, y + h / 2), (end + 0.17, y + h / 2))
        path_arrow(ax, [(2.5, y + h / 2), (2.5, y + h + 0.22), (end + 0.3, y + h + 0.22), (end + 0.3, y + h / 2 + 0.13)],
                   INK, lw=1)
        label(ax, 5.4, y + h + 0.32, residual_note, size=7, color="#4a5568", style="italic")
        arrow(ax, (2.5, y + h / 2), (steps[0][0], y + h / 2))
        return end + 0.3

    d, hd = cfg["hidden"], cfg["head_dim"]
    end = row(2.75, [
        (2.75, 1.05, f"RMSNorm\ninput_\nlayernorm\n(eps 1e-5)", OURS),
        (4.05, 1.35, f"q_proj {d}→{cfg['heads']}×{hd}\nk_proj {d}→{cfg['kv_heads']}×{hd}\n"
                     f"v_proj {d}→{cfg['kv_heads']}×{hd}", MODEL),
        (5.65, 1.0, "RoPE on\nq and k\nrope_theta\n= 1e6", OURS),
        (6.9, 1.45, "attention (SDPA)\ngrouped-query:\n2 q heads share\neach k/v head", MODEL),
        (8.6, 0.75, f"o_proj\n{cfg['heads']}×{hd}\n→{d}", MODEL)], "residual: x passes around the sublayer")
    label(ax, 7.6, 2.55, "keys/values → KV cache (past_key_values.update)", size=7, color=MODEL)
    path_arrow(ax, [(end, 2.75 + 0.35), (end, 2.4), (2.5, 2.4), (2.5, 1.0 + 0.475)], INK, lw=1)
    row(0.55, [
        (2.75, 1.05, "RMSNorm\npost_attention_\nlayernorm", OURS),
        (4.05, 1.55, f"gate_proj {d}→{cfg['ffn']}\nup_proj {d}→{cfg['ffn']}\n(intermediate_size)", MODEL),
        (5.85, 1.5, "SwiGLU:\nsilu(gate(x))\n× up(x)", OURS),
        (7.6, 1.25, f"down_proj\n{cfg['ffn']}→{d}", MODEL)], "residual again; the sum goes to the next block")
    label(ax, 6.15, 0.3, f"MLP (use_moe false); hidden_size {d}, {cfg['heads']} heads × head_dim {hd}, "
          f"num_key_value_heads {cfg['kv_heads']}  (assets/minimind-tiny/config.json)", size=7, color="#4a5568")
    return save(fig, out_dir, "minimind_block.svg")


def plan_a_plan_b(out_dir: Path) -> Path:
    """Notebook 05: the processes behind the same OpenAI API: our server (plan A) and real vLLM (plan B)."""
    fig, ax = canvas(3.6)
    label(ax, 0.2, 3.4, "the same client code; only base_url changes", ha="left", size=8.5, weight="bold")
    box(ax, 0.2, 1.2, 1.9, 1.5, "openai SDK\nclient.chat.\ncompletions.create\n(model, messages)", CLIENT, size=7.5)
    lane(ax, 2.6, 1.95, 7.3, 1.3, "plan A: one python process (python -m minimind_course.serve)", OURS)
    lane(ax, 2.6, 0.1, 7.3, 1.7, "plan B: a process group (VLLMServer, serving/vllm_launcher.py)", VLLM)
    a = [(2.75, 1.75, "uvicorn + FastAPI\nserving/app.py\n(asyncio loop)", OURS),
         (4.75, 1.85, "engine worker thread\nscheduler, paged KV\ncache (engine/)", MODEL),
         (6.85, 2.9, "MiniMindForCausalLM (model/minimind.py)\nreads the .pth or the bundled folder", MODEL)]
    b = [(2.75, 1.75, "vllm serve: API\nserver process\n(entrypoints/openai)", VLLM),
         (4.75, 1.85, "EngineCore process\nscheduler, PagedAttention\nKV cache", VLLM),
         (6.85, 2.9, "Worker process: vLLM's own\nLlamaForCausalLM / Qwen3ForCausalLM\nreads the export folder", VLLM)]
    for y, steps in ((2.05, a), (0.25, b)):
        for i, (x, w, text, color) in enumerate(steps):
            box(ax, x, y, w, 0.85, text, color, size=7.3)
            if i:
                arrow(ax, (steps[i - 1][0] + steps[i - 1][1], y + 0.42), (x, y + 0.42))
    arrow(ax, (2.1, 2.2), (2.75, 2.47), CLIENT)
    arrow(ax, (2.1, 1.6), (2.75, 0.67), CLIENT)
    label(ax, 1.15, 0.95, "base_url = the server's\nroot + /v1; POST\n/v1/chat/completions", size=7,
          color=CLIENT)
    label(ax, 8.3, 1.3, "minimind_course.export writes it (figure below)", size=7, color="#4a5568", style="italic")
    return save(fig, out_dir, "plan_a_plan_b.svg")


def export_mapping(out_dir: Path) -> Path:
    """Notebook 05: what minimind_course.export changes between MiniMind's folder and a vLLM-native one (export.py)."""
    fig, ax = canvas(3.75)
    lx, rx, w = 0.2, 5.6, 4.2
    label(ax, lx, 3.55, "MiniMind: its checkpoint and config", ha="left", size=8.5, weight="bold", color=MODEL)
    label(ax, rx, 3.55, "export: a model vLLM serves natively", ha="left", size=8.5, weight="bold", color=VLLM)
    rows = [
        ('config.json: architectures\n"MiniMindForCausalLM", model_type "minimind"',
         'LlamaForCausalLM / "llama" (MiniMind2)\nQwen3ForCausalLM / "qwen3" (q_norm, k_norm keys)', "renamed"),
        ("rope_theta (+ upstream's yarn)", "rope_parameters {rope_type, rope_theta, …}", "translated"),
        ("model.embed_tokens, model.layers.N.self_attn.\n{q,k,v,o}_proj, input_layernorm, mlp.{gate,up,\n"
         "down}_proj, post_attention_layernorm, model.norm", "the same names: the same maths", "kept"),
        ("lm_head tied to embed_tokens (stored once)", "lm_head.weight written out", "copied"),
        ("MoE: mlp.experts.E.{gate,up,down}_proj;\nmlp.shared_experts.J.*", "Qwen3-MoE: experts.gate_up_proj, "
         "experts.down_proj;\nDeepSeek-MoE: shared_experts.* (one wider MLP)", "stacked"),
    ]
    y = 3.3
    for left, right, how in rows:
        h = 0.3 + 0.17 * max(left.count("\n"), right.count("\n"))
        y -= h
        box(ax, lx, y, w, h, left, MODEL, size=7, mono=True, align="left", radius=0.03)
        box(ax, rx, y, w, h, right, VLLM, size=7, mono=True, align="left", radius=0.03)
        arrow(ax, (lx + w, y + h / 2), (rx, y + h / 2), INK if how != "kept" else MUTED)
        label(ax, (lx + w + rx) / 2, y + h / 2 + 0.1, how, size=7, color="#4a5568", style="italic")
        y -= 0.1
    label(ax, lx, 0.22, "to_vllm_native() loads the renamed weights with strict=True: every tensor finds its place; "
          "no --trust-remote-code is needed", ha="left", size=7.5, color="#4a5568")
    return save(fig, out_dir, "export_mapping.svg")


def ecosystem_map(out_dir: Path) -> Path:
    """Notebook 08: one OpenAI-compatible server, many clients, and which URL each of them wants."""
    fig, ax = canvas(3.9)
    box(ax, 6.6, 0.9, 3.2, 2.1, "", OURS)
    label(ax, 8.2, 2.75, "one server: ours or vLLM", size=8.5, weight="bold", color=OURS)
    root_y, base_y = 2.35, 1.75
    label(ax, 6.75, root_y, "root  http://HOST:8998", ha="left", size=7.5, mono=True)
    label(ax, 6.75, 2.1, "  /health  /metrics", ha="left", size=7.5, mono=True, color="#4a5568")
    label(ax, 6.75, base_y, "base URL  …:8998/v1", ha="left", size=7.5, mono=True)
    label(ax, 6.75, 1.5, "  /models  /chat/completions", ha="left", size=7.5, mono=True, color="#4a5568")
    label(ax, 6.75, 1.25, "  /completions", ha="left", size=7.5, mono=True, color="#4a5568")
    clients = [  # (y, name, which URL it is given, the URL its arrow ends at)
        (3.25, "openai SDK (python, JS), curl", "given the base URL …/v1", base_y),
        (2.65, "LangChain ChatOpenAI, LlamaIndex OpenAILike", "given the base URL …/v1", base_y),
        (2.05, "IDE plug-ins (Continue): chat + completions", "given the base URL …/v1", base_y),
        (1.45, "chat apps: NextChat, Chatbox", "given the root: they append /v1/…", root_y),
        (0.85, "browser pages, plug-ins (chat.html, translators)", "base URL, after a CORS preflight", base_y),
    ]
    for i, (y, name, url, end_y) in enumerate(clients):
        box(ax, 0.2, y - 0.25, 3.6, 0.5, "", CLIENT)
        label(ax, 0.3, y + 0.09, name, ha="left", size=7.5)
        label(ax, 0.3, y - 0.12, url, ha="left", size=7, color="#4a5568", style="italic")
        arrow(ax, (3.8, y), (6.6, end_y - 0.05 * (i - 2)), CLIENT if end_y == base_y else MODEL, lw=1)
    label(ax, 0.2, 0.3, "every client needs the same three facts: a URL, any API key (the source's sk-xxxx unless "
          "the server was started with --api-key), the model name (minimind)", ha="left", size=7.5, color="#4a5568")
    return save(fig, out_dir, "ecosystem_map.svg")


def cors_preflight(out_dir: Path) -> Path:
    """Notebook 08: a page on another origin asks the browser, the browser asks the server (CORSMiddleware)."""
    fig, ax = canvas(4.35)
    cols = [(1.0, "page on another origin\n(chat.html, NextChat)", CLIENT), (4.6, "browser", "#4a5568"),
            (8.9, "server (ours or vLLM)", OURS)]
    top, bottom = 3.75, 0.5
    for x, name, color in cols:
        box(ax, x - 0.95, top, 1.9, 0.5, name, OURS if color == OURS else CLIENT if color == CLIENT else MUTED,
            size=7.5, weight="bold")
        ax.plot([x, x], [bottom, top], color=color, lw=1.1, linestyle=":")
    steps = [  # (y, from, to, lines, colour)
        (3.45, 0, 1, ["fetch(url, {method: 'POST', headers})"], CLIENT),
        (3.0, 1, 2, ["OPTIONS /v1/chat/completions", "Origin: http://localhost:3000",
                     "Access-Control-Request-Method: POST",
                     "Access-Control-Request-Headers: authorization,content-type"], "#4a5568"),
        (2.05, 2, 1, ["200   Access-Control-Allow-Origin: *", "Access-Control-Allow-Methods: …, POST, …",
                      "Access-Control-Allow-Headers: authorization,content-type"], OURS),
        (1.2, 1, 2, ["the real request: POST /v1/chat/completions (Origin: …)"], "#4a5568"),
        (0.75, 2, 0, ["200 + Allow-Origin: the answer (or stream)"], OURS),
    ]
    for i, (y, a, b, lines, color) in enumerate(steps):
        xa, xb = cols[a][0], cols[b][0]
        arrow(ax, (xa, y), (xb, y), color, lw=1.3)
        badge(ax, min(xa, xb) + 0.25, y, i + 1, OURS if color == OURS else CLIENT)
        if len(lines) > 1:
            label(ax, min(xa, xb) + 0.45, y - 0.07, "\n".join(lines), ha="left", va="top", size=6.8, mono=True)
        else:
            label(ax, min(xa, xb) + 0.45, y + 0.12, lines[0], ha="left", size=6.8, mono=True)
    label(ax, 5.0, 0.25, "without the Allow headers of step 3 the browser stops after it, and the page only sees "
          "\"Failed to fetch\"", size=7.3, color=ERROR)
    return save(fig, out_dir, "cors_preflight.svg")


def roofline(out_dir: Path) -> Path:
    """Notebook 09: a schematic roofline: decode at batch B does about B multiply-adds per weight byte read."""
    fig, ax0 = canvas(4.0)
    ax = fig.add_axes((0.08, 0.14, 0.5, 0.78))
    ridge, peak = 10.0, 10.0  # schematic units: the ridge point where bandwidth × intensity reaches peak compute
    xs = [0.1, ridge, 1000.0]
    ax.plot(xs, [min(peak, x) for x in xs], color=OURS, lw=2)
    ax.set(xscale="log", yscale="log", xlim=(0.1, 1000), ylim=(0.1, 30), xticks=[], yticks=[])
    ax.minorticks_off()
    ax.set_xlabel("arithmetic intensity: FLOPs per byte read from memory →", fontsize=8)
    ax.set_ylabel("attainable FLOP/s →", fontsize=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.text(0.12, 3.0, "memory-bound:\nFLOP/s = bandwidth\n× intensity", fontsize=7.5, color=OURS, ha="left")
    ax.text(40, 13, "compute-bound: peak FLOP/s", fontsize=7.5, color=OURS, ha="center")
    points = [(0.5, "decode, batch 1", CLIENT), (4.0, "decode, batch B\n(B × the work per byte)", CLIENT),
              (100.0, "prefill of a long\nprompt", MODEL)]
    for x, text, color in points:
        ax.plot([x], [min(peak, x)], "o", color=color, ms=7)
        ax.text(x * 1.25, min(peak, x) * 0.55, text, fontsize=7.5, color=color, va="top")
    ax.annotate("", xy=(3.6, 3.6), xytext=(0.56, 0.56),
                arrowprops=dict(arrowstyle="-|>", color=CLIENT, lw=1.2, connectionstyle="arc3,rad=0.3"))
    ax.axvline(ridge, color=MUTED, lw=0.8, linestyle="--")
    ax.text(ridge * 1.1, 0.13, "ridge point", fontsize=7, color="#4a5568")
    # the reasoning, on the right
    lines = [("decode reads every weight once per step", INK, "bold"),
             ("one token of one sequence: each weight is used for", INK, "normal"),
             ("one multiply-add (2 FLOPs) per weight read", INK, "normal"),
             ("→ tokens/s ≤ bandwidth / bytes of weights", OURS, "bold"),
             ("", INK, "normal"),
             ("batching moves a step right along the roof", INK, "bold"),
             ("B sequences in one step share the read:", INK, "normal"),
             ("B multiply-adds per weight, the same bytes", INK, "normal"),
             ("→ up to B × the tokens/s, until compute", CLIENT, "bold"),
             ("   (or attention over long contexts) limits it", CLIENT, "normal"),
             ("", INK, "normal"),
             ("prefill feeds many tokens per weight read:", INK, "normal"),
             ("it is compute-bound already", MODEL, "normal"),
             ("", INK, "normal"),
             ("a schematic: no measured numbers on the axes", "#4a5568", "normal")]
    for i, (text, color, weight) in enumerate(lines):
        label(ax0, 6.25, 3.7 - 0.22 * i, text, ha="left", size=7.8, color=color, weight=weight)
    return save(fig, out_dir, "roofline.svg")


FIGURES = {  # file name → function; the test compares this list with the committed files
    "request_path.svg": request_path,
    "sse_chunk_sequence.svg": sse_chunk_sequence,
    "tool_round_trip.svg": tool_round_trip,
    "history_window.svg": history_window,
    "paged_kv_cache.svg": paged_kv_cache,
    "minimind_block.svg": minimind_block,
    "plan_a_plan_b.svg": plan_a_plan_b,
    "export_mapping.svg": export_mapping,
    "ecosystem_map.svg": ecosystem_map,
    "cors_preflight.svg": cors_preflight,
    "roofline.svg": roofline,
}


def main(argv: list[str]) -> None:
    out_dir = Path(argv[0]) if argv else HERE
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, draw in FIGURES.items():
        print(draw(out_dir))


if __name__ == "__main__":
    main(sys.argv[1:])
