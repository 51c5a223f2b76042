"""Automatic prefix caching: chained block hashes, hits that only move the prefill's start, shared blocks that are
never written, LRU eviction under pressure, the n choices of a request sharing their prompt blocks."""

import asyncio

import pytest

from minimind_course.engine.block_manager import BlockManager, block_hash
from minimind_course.engine.engine import Engine, StepStats
from minimind_course.engine.sampling import SamplingParams
from minimind_course.engine.scheduler import Scheduler
from minimind_course.engine.sequence import Request, Sequence

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
HISTORY = [
    {"role": "system", "content": "你是一个乐于助人的助手，回答要简短。"},
    {"role": "user", "content": "你好，请介绍一下你自己。"},
    {"role": "assistant", "content": "你好！我是 MiniMind，一个很小的语言模型，很高兴为你服务。"},
    {"role": "user", "content": "中国的首都是哪里？"},
]


# ---- the block manager ---------------------------------------------------------------------------------------------
def committed(blocks: BlockManager, tokens: list[int], extra: int = -1) -> list[int]:
    """A sequence that computed ``tokens`` and let go of them: its block table before it freed it."""
    table: list[int] = []
    assert blocks.allocate(table, len(tokens))
    blocks.commit(table, tokens, len(tokens), extra)
    held = list(table)
    blocks.free(table)
    return held


def test_a_hit_is_the_longest_chain_of_full_blocks_before_the_last_token():
    blocks = BlockManager(8, 4)
    held = committed(blocks, list(range(12)))  # three full blocks
    assert blocks.cached_prefix(list(range(12)), -1) == held[:2]  # the last token is recomputed: two blocks
    assert blocks.cached_prefix(list(range(13)), -1) == held  # one more token: all three
    assert blocks.cached_prefix([0, 1, 2, 3, 9, 9, 9, 9, 8], -1) == held[:1]  # the chain breaks at block two
    assert blocks.cached_prefix([9, 1, 2, 3, 4, 5, 6, 7, 8], -1) == []  # a different first block: nothing after it
    assert blocks.cached_prefix(list(range(13)), 0) == []  # another LoRA adapter: other keys and values
    assert block_hash(None, [1, 2], -1) != block_hash(None, [1, 2], 0) != block_hash(block_hash(None, [0], -1), [1, 2], 0)


def test_shared_blocks_are_counted_and_cached_blocks_are_evicted_last_freed_tail_first():
    blocks = BlockManager(4, 4)
    first = committed(blocks, list(range(8)))  # 2 cached blocks, nobody holds them
    assert blocks.num_free == 4 and blocks.used_blocks == 0  # cached but free: they count as free space
    a, b = [], []
    blocks.hold(a, blocks.cached_prefix(list(range(9)), -1))
    blocks.hold(b, blocks.cached_prefix(list(range(9)), -1))
    assert a == b == first and blocks.ref_counts[first[0]] == 2 and blocks.used_blocks == 2
    blocks.free(a)
    assert blocks.ref_counts[first[0]] == 1 and blocks.used_blocks == 2  # still held by b
    blocks.free(b)
    table: list[int] = []
    assert blocks.allocate(table, 8)  # the two plain free blocks go first, the cached ones stay
    assert set(table).isdisjoint(first) and blocks.cached_prefix(list(range(9)), -1) == first
    assert blocks.allocate(table, 12)  # one more: the tail of the cached chain is evicted, its head kept
    assert table[-1] == first[1] and blocks.cached_prefix(list(range(9)), -1) == first[:1]


def test_a_choice_waits_for_the_first_one_then_shares_its_prompt_blocks_and_adapters_do_not():
    blocks = BlockManager(32, 4)
    scheduler = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=64)
    prompt = list(range(3, 13))  # 10 tokens: blocks 0 and 1 are full before the last token

    def request(n: int, lora_id: int = -1) -> Request:
        req = Request("r", SamplingParams(n=n), [], len(prompt), 0.0, lora_id=lora_id)
        req.sequences += [Sequence(i, req, i, list(prompt), None, None, None) for i in range(n)]
        scheduler.add(req)
        return req

    two = request(2)
    first, second = two.sequences
    assert scheduler.forks == [second] and second.block_table == []
    plan = scheduler.schedule()
    assert plan.prefills == [(first, 10)]  # the second choice is not computed a second time
    scheduler.computed(first, 10)
    first.token_ids.append(1)
    plan = scheduler.schedule()
    assert second.block_table[:2] == first.block_table[:2] and second.block_table[2] != first.block_table[2]
    assert (second, 2) in plan.prefills and second.num_computed == 8  # the hit: only the last two tokens
    assert (scheduler.prefix_queries, scheduler.prefix_hits) == (20, 8)
    other = request(1, lora_id=0).sequences[0]
    assert other.num_computed == 0 and set(other.block_table).isdisjoint(first.block_table)


# ---- the engine --------------------------------------------------------------------------------------------------
def counting(own: Engine) -> list[StepStats]:
    seen: list[StepStats] = []
    own.stats_listeners.append(seen.append)
    return seen


def guard_writes(own: Engine) -> list[int]:
    """Record every write into a cached (hashed) block: there must be none."""
    bad: list[int] = []
    view, blocks = own.kv_cache.batch_view, own.block_manager

    def checked(tables, starts, query_lens):
        kv = view(tables, starts, query_lens)
        written = {slot // blocks.block_size for slot in kv.slot_mapping.tolist() if slot != own.kv_cache.scratch_slot}
        bad.extend(block for block in written if blocks.hashes[block] is not None)
        return kv

    own.kv_cache.batch_view = checked
    return bad


@pytest.mark.asyncio(loop_scope="session")
async def test_greedy_answers_are_the_same_with_the_cache_on_and_off_and_a_follow_up_turn_hits(engine):
    prompt = engine.encode(engine.chat_prompt(HISTORY))
    longer = engine.encode(engine.chat_prompt([*HISTORY, {"role": "assistant", "content": "北京。"},
                                               {"role": "user", "content": "那上海呢？"}]))
    assert longer[:len(prompt) - 1] == prompt[:-1] and len(prompt) > 64
    off = Engine(engine.model, engine.tokenizer, kv_cache_memory=32 * 2**20, enable_prefix_caching=False)
    on = Engine(engine.model, engine.tokenizer, kv_cache_memory=32 * 2**20)
    seen, bad = counting(on), guard_writes(on)
    try:
        expected = [(await off.submit(p, GREEDY).result()).texts for p in (prompt, longer, prompt)]
        got = [(await on.submit(p, GREEDY).result()).texts for p in (prompt, longer, prompt)]
    finally:
        off.close()
        on.close()
    assert got == expected
    hits = [s.prefix_cache_hits for s in seen if s.prefix_cache_queries]
    queries = [s.prefix_cache_queries for s in seen if s.prefix_cache_queries]
    shared = (len(prompt) - 1) // 16 * 16
    assert queries == [len(prompt), len(longer), len(prompt)]
    assert hits[0] == 0 and hits[1] >= shared and hits[2] == shared  # the second turn reuses the first one's blocks
    assert bad == []


@pytest.mark.asyncio(loop_scope="session")
async def test_n_choices_share_prompt_blocks_and_keep_their_answers(engine):
    prompt = engine.encode(engine.chat_prompt(HISTORY))
    params = SamplingParams(n=3, temperature=2.0, max_tokens=10, seed=7, ignore_eos=True)  # flat: choices differ
    answers = {}
    for caching in (False, True):
        own = Engine(engine.model, engine.tokenizer, kv_cache_memory=32 * 2**20, enable_prefix_caching=caching)
        seen, bad = counting(own), guard_writes(own)
        try:
            answers[caching] = (await own.submit(prompt, params).result()).texts
        finally:
            own.close()
        assert bad == []
    shared = (len(prompt) - 1) // 16 * 16
    assert sum(s.prefix_cache_hits for s in seen) == 2 * shared  # choices 2 and 3 found choice 1's blocks
    assert answers[True] == answers[False] and len(set(answers[True])) > 1  # seeded: the same samples


@pytest.mark.asyncio(loop_scope="session")
async def test_under_pressure_old_prefixes_are_evicted_and_answers_stay_right(engine):
    questions = ["讲一个关于猫的故事", "什么是机器学习？", "推荐一本好书", "怎样学习编程？", "今天天气怎么样？",
                 "写一首关于春天的诗"]
    prompts = [engine.encode(engine.chat_prompt([HISTORY[0], {"role": "user", "content": q * 3}])) for q in questions]
    solo = [(await engine.submit(p, GREEDY).result()).texts for p in prompts]
    per_token = 2 * engine.model.config.num_hidden_layers * engine.model.config.num_key_value_heads * \
        engine.model.config.head_dim * 4
    small = Engine(engine.model, engine.tokenizer, max_model_len=128, kv_cache_memory=14 * 16 * per_token)
    seen, bad = counting(small), guard_writes(small)
    try:
        together = await asyncio.gather(*(small.submit(p, GREEDY).result() for p in prompts))
        again = [(await small.submit(p, GREEDY).result()).texts for p in prompts[:2]]
    finally:
        small.close()
    assert [r.texts for r in together] == solo and again == solo[:2] and bad == []
    assert small.block_manager.num_blocks == 14 and small.block_manager.used_blocks == 0
    placed = [(s.prefix_cache_queries, s.prefix_cache_hits) for s in seen if s.prefix_cache_queries]
    assert sum(hits for _, hits in placed[:-2]) > 0  # later prompts found the shared system-prompt block
    for prompt, (queries, hits) in zip(prompts, placed[-2:]):
        # asked again: the 14 blocks could not keep every answer's blocks, the least recently used went (the
        # prompt's own tail), the system-prompt block every request used survived
        assert queries == len(prompt) and 0 < hits < (len(prompt) - 1) // 16 * 16


def test_serve_turns_the_cache_off_with_vllms_flag():
    from minimind_course.serve import parse_args

    assert parse_args([]).enable_prefix_caching is True
    assert parse_args(["--no-enable-prefix-caching"]).enable_prefix_caching is False
