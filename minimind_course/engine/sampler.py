"""The sampler: one step's logits rows in, one token per row out (with its log-probability when asked).

Plain greedy rows (no bias, penalty, constraint or logprobs) share one ``argmax``; every other row applies its
constraint mask (a grammar sets disallowed tokens to -inf), then its logits pipeline (``sampling.py``), then
argmax or a draw from the choice's own generator, seeded per choice so that ``seed`` reproduces the same text.
"""

from __future__ import annotations

import torch

from minimind_course.engine.outputs import TokenLogprob
from minimind_course.engine.sampling import make_generator, next_tokens
from minimind_course.engine.sequence import Sequence

Sampled = tuple[int, TokenLogprob | None]


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice ``index``: the request's seed for the first, a distinct mix of both for the others."""
    if seed is None or index == 0:
        return seed
    return hash((seed, index)) & (2**63 - 1)


def choice_generator(seed: int | None, index: int, device: torch.device) -> torch.Generator:
    """The private random stream of one choice of a request."""
    return make_generator(choice_seed(seed, index), device)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Log-probabilities of the chosen tokens under the model's own distribution (before temperature and
    penalties, as vLLM reports them by default), with the ``top`` most likely tokens of each row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, tokens[:, None]).squeeze(1).tolist()
    best = logp.topk(top, dim=-1) if top else None
    rows = []
    for i, (token, value) in enumerate(zip(tokens.tolist(), chosen)):
        alternatives = tuple(zip(best.indices[i].tolist(), best.values[i].tolist())) if best is not None else ()
        rows.append(TokenLogprob(token, value, alternatives))
    return rows


def sample(ready: list[tuple[Sequence, torch.Tensor]]) -> list[Sampled | Exception]:
    """Each row's next token; a row whose constraint or pipeline raised gets the exception instead."""
    out: list[Sampled | Exception | None] = [None] * len(ready)
    plain = [i for i, (seq, _) in enumerate(ready) if seq.request.simple_greedy]
    if plain:
        logits = torch.stack([ready[i][1] for i in plain])
        for i, token in zip(plain, logits.argmax(dim=-1).tolist()):
            out[i] = (token, None)
    for i, (seq, row) in enumerate(ready):
        if out[i] is None:
            try:
                out[i] = sample_one(seq, row)
            except Exception as err:  # its constraint or sampling failed: only this request ends
                out[i] = err
    return out


def sample_one(seq: Sequence, logits: torch.Tensor) -> Sampled:
    """One sequence's token from its 1-D logits row: constraint mask, pipeline, argmax or draw, logprob."""
    params = seq.request.params
    scores = logits[None].float().clone()
    if seq.constraint is not None:
        seq.constraint.apply(scores[0])
    ids = torch.tensor([seq.token_ids], device=scores.device)
    token = int(next_tokens(params, seq.request.pipeline, ids, scores, seq.generator)[0])
    logprob = None
    if params.logprobs is not None:
        logprob = token_logprobs(logits[None], torch.tensor([token]), params.logprobs)[0]
    return token, logprob
