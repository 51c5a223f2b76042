"""Continuous batching: batched answers equal solo ones, sequences join and leave the batch step by step,
seats and KV blocks bound the batch, one request's failure stays its own, the constraint hook."""

import asyncio

import openai
import pytest
import torch
from torch import nn

from minimind_course.engine.block_manager import BlockManager
from minimind_course.engine.kv_cache import kv_bytes_per_token
from minimind_course.engine.scheduler import Scheduler
from minimind_course.engine.engine import Engine, RequestTooLargeError, StepStats
from minimind_course.engine.sampling import SamplingParams
from scripted_model import ScriptedLM

QUESTIONS = ["你好", "What is MiniMind?", "讲一个关于大海的故事", "1+1=?", "Tell me about the sea.",
             "我叫小明，你叫什么名字？", "Write a short poem about rain", "天空为什么是蓝色的？"]


def prompts_for(engine: Engine, count: int) -> list[list[int]]:
    """Mixed prompts: eight questions, repeated up to three times in one message (different lengths)."""
    return [engine.encode(engine.chat_prompt([{"role": "user", "content": QUESTIONS[i % 8] * (1 + i % 3)}]))
            for i in range(count)]


async def answer(engine: Engine, prompt: list[int], params: SamplingParams, **kwargs) -> list[str]:
    return (await engine.submit(prompt, params, **kwargs).result()).texts


def own_engine(engine: Engine, **kwargs) -> Engine:
    return Engine(engine.model, engine.tokenizer, **kwargs)


# ---- same answers ---------------------------------------------------------------------------------------------
@pytest.mark.asyncio(loop_scope="session")
async def test_32_concurrent_mixed_greedy_requests_streamed_and_not_match_their_solo_answers(base_url):
    async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=300) as client:
        async def ask(i: int) -> str:
            body = dict(model="minimind", messages=[{"role": "user", "content": QUESTIONS[i % 8] * (1 + i % 3)}],
                        max_tokens=8 + (i * 7) % 48, temperature=0)
            if i % 2:
                return (await client.chat.completions.create(**body)).choices[0].message.content
            stream = await client.chat.completions.create(**body, stream=True)
            return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])

        solo = [await ask(i) for i in range(32)]
        together = await asyncio.gather(*(ask(i) for i in range(32)))
    assert list(together) == solo
    assert len(set(solo)) > 8  # different lengths of one question give different answers too


@pytest.mark.asyncio(loop_scope="session")
async def test_seeded_sampling_n_and_stop_strings_are_the_same_alone_and_in_a_batch(engine):
    prompts = prompts_for(engine, 12)
    params = [SamplingParams(n=1 + i % 3, temperature=0.9 if i % 2 else 0.0, top_p=0.9, max_tokens=30,
                             seed=100 + i if i % 2 else None, stop=("。", ".") if i % 4 == 0 else ())
              for i in range(12)]
    solo = [await answer(engine, p, sp) for p, sp in zip(prompts, params)]
    together = await asyncio.gather(*(answer(engine, p, sp) for p, sp in zip(prompts, params)))
    assert list(together) == solo
    stopped = [text for i in range(0, 12, 4) for text in solo[i]]
    assert all("。" not in text and "." not in text for text in stopped)
    assert [len(texts) for texts in solo] == [1 + i % 3 for i in range(12)]


# ---- joining and leaving ------------------------------------------------------------------------------------
@pytest.mark.asyncio(loop_scope="session")
async def test_a_request_joins_while_another_decodes_and_a_leaver_leaves_within_one_step(engine):
    prompt, other = prompts_for(engine, 2)
    solo = await answer(engine, other, SamplingParams(temperature=0, max_tokens=10))
    own = own_engine(engine)
    steps: list[StepStats] = []
    own.stats_listeners.append(steps.append)
    try:
        long = own.submit(prompt, SamplingParams(temperature=0, max_tokens=400, ignore_eos=True), "long")
        stream = long.__aiter__()
        first = await stream.__anext__()
        joined = await answer(own, other, SamplingParams(temperature=0, max_tokens=10))
        during = (await stream.__anext__()).completion_tokens  # steps that piled up arrive merged
        steps_at_cancel = len(steps)
        long.cancel()
        while own.active is not None:
            await asyncio.sleep(0.002)
        steps_after = len(steps)
    finally:
        own.close()
    assert joined == solo  # it joined a running batch and still gave its solo answer
    assert during - first.completion_tokens >= 10  # "long" kept decoding while the other one came and went
    trace = {t.request_id: t for t in own.traces()}["long"]
    assert trace.outcome == "cancelled" and trace.completion_tokens < 400
    assert steps_after - steps_at_cancel <= 2  # the step under way when cancel() came, at most one more


def test_a_cancelled_sequence_frees_its_seat_and_blocks_for_a_waiting_request(tokenizer_engine):
    engine = tokenizer_engine(step_delay=0.01, max_num_seqs=2)

    async def run():
        params = SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True)
        a, b = engine.submit([1, 2], params, "a"), engine.submit([1, 2], params, "b")
        waiting = engine.submit([1, 2], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), "c")
        streams = [a.__aiter__(), b.__aiter__()]  # kept: a dropped iterator cancels its request
        for stream in streams:
            await stream.__anext__()
        assert (engine.num_running, engine.queued) == (2, 1)  # two seats, both taken
        used = engine.block_manager.used_blocks
        a.cancel()
        result = await waiting.result()
        b.cancel()
        while engine.active is not None:
            await asyncio.sleep(0.005)
        return used, result

    used, result = asyncio.run(run())
    engine.close()
    assert used == 2 and result.completion_tokens == 3
    assert engine.block_manager.used_blocks == 0  # every block came back


# ---- limits --------------------------------------------------------------------------------------------------
@pytest.fixture
def tokenizer_engine(engine):
    """Engines over a scripted model that repeats token 5 (so answers never end by themselves)."""
    made: list[Engine] = []

    def make(step_delay: float = 0.0, **kwargs) -> Engine:
        made.append(Engine(ScriptedLM([5], len(engine.tokenizer), step_delay=step_delay), engine.tokenizer,
                           **kwargs))
        return made[-1]

    yield make
    for own in made:
        own.close()


@pytest.mark.asyncio(loop_scope="session")
async def test_kv_memory_bounds_the_batch_and_preempted_sequences_still_give_their_solo_answers(engine):
    prompts = [engine.encode(engine.chat_prompt([{"role": "user", "content": q * 4}])) for q in QUESTIONS[2:]]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    solo = [await answer(engine, p, params) for p in prompts]
    per_token = kv_bytes_per_token(engine.model.config, torch.float32)
    # 12 blocks of 16 tokens; the six prompts alone need 20, and each answer adds 3 more
    own = own_engine(engine, max_model_len=128, kv_cache_memory=12 * 16 * per_token)
    usage, preemptions, waiting = [], [], []

    def watch(stats: StepStats) -> None:
        usage.append(own.block_manager.usage)
        waiting.append(own.queued)
        preemptions.append(stats.preemptions)

    own.stats_listeners.append(watch)
    try:
        together = await asyncio.gather(*(answer(own, p, params) for p in prompts))
    finally:
        own.close()
    assert list(together) == solo
    assert own.kv_cache.num_blocks == 12 and max(usage) <= 1.0
    assert max(waiting) > 0  # admission waited for blocks (the 32 seats were never the limit)
    assert sum(preemptions) > 0  # sequences grew past the free blocks and were recomputed later, same answers


def test_requests_that_can_never_fit_are_refused_at_once(tokenizer_engine):
    engine = tokenizer_engine(max_num_seqs=4, max_model_len=64, kv_cache_memory=8 * 16 * 512)  # 8 blocks

    async def submit(prompt_len: int, n: int):
        return engine.submit([1] * prompt_len, SamplingParams(n=n, max_tokens=1))

    with pytest.raises(RequestTooLargeError) as err:
        asyncio.run(submit(4, 5))
    assert err.value.param == "n" and "4 sequences" in str(err.value)
    with pytest.raises(RequestTooLargeError):
        asyncio.run(submit(60, 3))  # three copies of 61 tokens need 12 blocks
    with pytest.raises(ValueError, match="fewer than one sequence"):
        Engine(engine.model, engine.tokenizer, max_model_len=4096, kv_cache_memory=8 * 16 * 512)


def test_the_scheduler_chunks_long_prompts_and_keeps_decoding_the_others():
    from minimind_course.engine.sequence import Request, Sequence

    scheduler = Scheduler(BlockManager(64, 16), max_num_seqs=4, max_num_batched_tokens=64)

    def sequence(tokens: int, computed: int) -> Sequence:
        request = Request(None, SamplingParams(), [], tokens, 0.0)
        seq = Sequence(tokens, request, 0, [1] * tokens, None, None, None)
        request.sequences.append(seq)
        scheduler.add(request)
        seq.num_computed = computed  # as if its earlier steps had run
        return seq

    running = sequence(20, 19)  # decoding: one token to feed
    long = sequence(150, 0)
    plans = []
    while long.uncomputed > 1:
        plan = scheduler.schedule()
        plans.append(([n for _, n in plan.prefills], [s.seq_id for s in plan.decodes]))
        for seq, n in plan.prefills:
            seq.num_computed += n
        running.num_computed += 1
        running.token_ids.append(1)
    assert plans == [([64], [20]), ([64], [20]), ([22], [20])]  # chunks of 64 tokens, a decode every step


# ---- failures and the constraint hook ----------------------------------------------------------------------------
class DigitsOnly:
    """A constraint: only tokens made of ASCII digits, done after ``length`` of them."""

    def __init__(self, tokenizer, length: int):
        self.allowed = torch.tensor([i for i in range(len(tokenizer))
                                     if (text := tokenizer.decode([i])).strip() and text.strip().isdigit()
                                     and text.isascii()])
        self.length = length
        self.accepted: list[int] = []

    def apply(self, logits: torch.Tensor) -> None:
        keep = logits[self.allowed].clone()
        logits.fill_(float("-inf"))
        logits[self.allowed] = keep

    def accept(self, token_id: int) -> None:
        assert token_id in self.allowed
        self.accepted.append(token_id)

    def done(self) -> bool:
        return len(self.accepted) >= self.length


class Exploding(DigitsOnly):
    def apply(self, logits: torch.Tensor) -> None:
        raise RuntimeError("constraint state is broken")


@pytest.mark.asyncio(loop_scope="session")
async def test_a_constraint_limits_every_choice_and_ends_it_with_stop(engine):
    prompt = prompts_for(engine, 1)[0]
    made: list[DigitsOnly] = []

    def factory() -> DigitsOnly:
        made.append(DigitsOnly(engine.tokenizer, 4))
        return made[-1]

    params = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=50)
    handle = engine.submit(prompt, params, constraint=factory)
    result = await handle.result()
    assert len(made) == 2 and all(len(c.accepted) == 4 for c in made)
    assert all(text.replace(" ", "").isdigit() for text in result.texts)
    assert result.finish_reasons == ["stop", "stop"] and result.completion_tokens == 8
    single = await engine.submit(prompt, SamplingParams(temperature=0, max_tokens=50),
                                 constraint=DigitsOnly(engine.tokenizer, 3)).result()
    assert single.texts[0].replace(" ", "").isdigit() and single.finish_reasons == ["stop"]
    with pytest.raises(ValueError, match="factory"):
        engine.submit(prompt, params, constraint=DigitsOnly(engine.tokenizer, 3))


class FailsOnToken(nn.Module):
    """The real model, except that a decode pass feeding ``token`` raises (a fault tied to one request)."""

    def __init__(self, model: nn.Module, token: int):
        super().__init__()
        self.inner, self.token = model, token
        self.config, self.generation_config = model.config, model.generation_config

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def forward(self, input_ids, **kwargs):
        if input_ids.shape[1] == 1 and (input_ids == self.token).any():
            raise RuntimeError("fault in one row")
        return self.inner(input_ids=input_ids, **kwargs)


@pytest.mark.asyncio(loop_scope="session")
async def test_a_failing_request_ends_alone_and_the_batch_goes_on(engine):
    prompts = prompts_for(engine, 6)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    solo = [await answer(engine, p, params) for p in prompts]
    digits = DigitsOnly(engine.tokenizer, 1)
    bad_token = int(digits.allowed[0])
    own = Engine(FailsOnToken(engine.model, bad_token), engine.tokenizer)
    forced = SamplingParams(temperature=0, max_tokens=24)
    try:
        results = await asyncio.gather(
            *(answer(own, p, params) for p in prompts),
            answer(own, prompts[0], forced, constraint=Exploding(engine.tokenizer, 1)),  # fails in its sampling
            answer(own, prompts[1], SamplingParams(temperature=0, max_tokens=24, stop=()),
                   constraint=OneToken(bad_token)),  # its next decode pass raises inside the batch
            return_exceptions=True)
    finally:
        own.close()
    assert list(results[:6]) == solo
    assert isinstance(results[6], RuntimeError) and "constraint state" in str(results[6])
    assert isinstance(results[7], RuntimeError) and "fault in one row" in str(results[7])
    outcomes = sorted(t.outcome for t in own.traces())
    assert outcomes == ["failed"] * 2 + ["finished"] * 6


class OneToken:
    """Forces one given token first, then lets the model choose; never done."""

    def __init__(self, token: int):
        self.token, self.count = token, 0

    def apply(self, logits: torch.Tensor) -> None:
        if self.count == 0:
            logits.fill_(float("-inf"))
            logits[self.token] = 0.0

    def accept(self, token_id: int) -> None:
        self.count += 1

    def done(self) -> bool:
        return False


# ---- /metrics ------------------------------------------------------------------------------------------------
def scrape(base: str) -> dict[tuple[str, tuple], float]:
    """``/metrics`` as {(sample name, sorted labels without model_name/engine): value}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(base + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            assert sample.labels.get("model_name") == "minimind-test" and sample.labels.get("engine") == "0"
            extra = tuple(sorted((k, v) for k, v in sample.labels.items() if k not in ("model_name", "engine")))
            samples[(sample.name, extra)] = sample.value
    return samples


def test_metrics_use_vllm_names_and_count_what_the_engine_did(make_server):
    import httpx

    server = make_server(max_queue=8, served_model_name="minimind-test")
    url = server.base_url + "/v1/completions"
    assert scrape(server.base_url)[("vllm:generation_tokens_total", ())] == 0
    usages = []
    with httpx.Client(timeout=120) as http:
        for i in range(3):
            body = {"model": "minimind-test", "prompt": "你好" * (i + 1), "max_tokens": 5 + i, "ignore_eos": True}
            usages.append(http.post(url, json=body).json()["usage"])
        with http.stream("POST", url, json={"model": "minimind-test", "prompt": "天空", "max_tokens": 900,
                                            "ignore_eos": True, "stream": True}) as streaming:
            lines = streaming.iter_lines()
            while not next(lines).startswith("data: {"):
                pass  # the first data line carries generated text: the request is in the batch now
            during = scrape(server.base_url)
        long_prompt = "一二三四五六七八九十" * 4  # the same prompt twice: the second finds its full blocks cached
        body = {"model": "minimind-test", "prompt": long_prompt, "max_tokens": 1, "ignore_eos": True}
        repeated = [http.post(url, json=body).json()["usage"]["prompt_tokens"] for _ in range(2)]
    done = scrape(server.base_url)
    assert done[("vllm:prefix_cache_queries_total", ())] >= sum(u["prompt_tokens"] for u in usages) + sum(repeated)
    assert done[("vllm:prefix_cache_hits_total", ())] >= (repeated[1] - 1) // 16 * 16 > 0
    assert during[("vllm:num_requests_running", ())] == 1 and during[("vllm:kv_cache_usage_perc", ())] > 0
    assert done[("vllm:prompt_tokens_total", ())] >= sum(u["prompt_tokens"] for u in usages)
    assert done[("vllm:generation_tokens_total", ())] >= sum(u["completion_tokens"] for u in usages) == 5 + 6 + 7
    assert done[("vllm:request_success_total", (("finished_reason", "length"),))] == 3 + 2
    assert done[("vllm:time_to_first_token_seconds_count", ())] == 4 + 2  # the streamed one got its first token too
    assert done[("vllm:e2e_request_latency_seconds_count", ())] == 3 + 2  # the one that was cut off is no success
    assert done[("vllm:request_generation_tokens_sum", ())] == 18 + 2
    assert done[("vllm:inter_token_latency_seconds_count", ())] >= 4 + 5 + 6
    assert done[("vllm:num_requests_waiting", ())] == 0


# ---- bench batching --------------------------------------------------------------------------------------------
def fake_level(concurrency: int, tok_s: float, ttft: float) -> dict:
    return {"concurrency": concurrency, "output_tokens_per_s": tok_s, "ttft_s": {"p50": ttft}, "itl_s": {"p50": 0.01}}


def test_bench_batching_report_ratios_summary_and_plot(tmp_path):
    from minimind_course.bench.batching import format_batching, plot_batching, ratios

    servers = [{"name": name, "levels": [fake_level(1, one, 0.02), fake_level(16, sixteen, ttft)],
                "server_metrics": {"vllm:generation_tokens_total": 4160.0,
                                   "vllm:time_to_first_token_seconds_sum": 2.0,
                                   "vllm:time_to_first_token_seconds_count": 50.0}}
               for name, one, sixteen, ttft in (("ours serial", 150, 150, 6.0), ("ours batched", 160, 960, 0.08),
                                                ("vLLM", 170, 800, 0.05))]
    stall = {"max_num_batched_tokens": 256, "prefill_s": 0.1, "itl_before_p50_s": 0.005, "itl_during_max_s": 0.03}
    report = {"settings": {"concurrency": [1, 16], "stall_prompt_tokens": 900}, "servers": servers,
              "in_process": {"minimind2_small_tokens_per_s": {"1": 70.0, "16": 700.0},
                             "prefill_stall": {"chunked": stall}}}
    report["ratios"] = ratios(report)
    assert report["ratios"] == pytest.approx({
        "batched_tok_s_16_over_1": 6.0, "batched_over_serial_at_1": 160 / 150, "batched_over_serial_at_16": 6.4,
        "batched_ttft_p50_16_over_1": 4.0, "batched_over_vllm_at_16": 1.2, "minimind2_small_16_over_1": 10.0})
    text = format_batching(report)
    assert "mean TTFT 40.0 ms over 50 requests" in text and "batched_over_vllm_at_16: 1.20" in text
    plot_batching(report, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.asyncio(loop_scope="session")
async def test_prefill_stall_measures_the_running_streams_gaps(engine):
    from minimind_course.bench.batching import prefill_stall

    own = own_engine(engine, max_num_batched_tokens=64)
    try:
        stall = await prefill_stall(own, 300, 2)
    finally:
        own.close()
    assert stall["prefill_s"] > 0 and stall["itl_before_p50_s"] > 0
    assert stall["itl_during_max_s"] >= stall["itl_during_p50_s"] > 0  # the streams kept getting tokens meanwhile


def test_closing_the_engine_ends_running_and_waiting_requests_with_an_error(tokenizer_engine):
    engine = tokenizer_engine(step_delay=0.01, max_num_seqs=1)

    async def run():
        params = SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True)
        running, waiting = engine.submit([1, 2], params, "running"), engine.submit([1, 2], params, "waiting")
        stream = running.__aiter__()
        await stream.__anext__()
        await asyncio.get_running_loop().run_in_executor(None, engine.close)
        with pytest.raises(RuntimeError, match="closed"):
            await waiting.result()
        with pytest.raises(RuntimeError, match="closed"):
            async for _ in stream:
                pass

    asyncio.run(run())
    assert sorted((t.request_id, t.outcome) for t in engine.traces()) == [("running", "cancelled"),
                                                                         ("waiting", "skipped")]


@pytest.mark.asyncio(loop_scope="session")
async def test_a_chunked_long_prompt_gives_the_unchunked_answer_while_others_decode(engine):
    story = engine.encode(engine.chat_prompt([{"role": "user", "content": "讲一个关于大海的故事。" * 40}]))
    assert len(story) > 300  # several chunks of 64 tokens
    params = SamplingParams(temperature=0, max_tokens=16)
    unchunked = own_engine(engine, max_num_batched_tokens=engine.max_model_len)
    try:
        whole = await answer(unchunked, story, params)  # the prompt in one pass
    finally:
        unchunked.close()
    chunked = own_engine(engine, max_num_batched_tokens=64)
    try:
        others = [chunked.submit(p, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
                  for p in prompts_for(chunked, 3)]
        assert await answer(chunked, story, params) == whole
        await asyncio.gather(*(h.result() for h in others))
    finally:
        chunked.close()
