"""``POST /tokenize`` and ``POST /detokenize`` in vLLM's shapes (not under /v1, as in vLLM): count a prompt's or a
chat's tokens exactly as the server would feed them to the model, and turn ids back into text."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from minimind_course.engine.sampling import SamplingParams
from minimind_course.serving.generation import Generation, get_generation
from minimind_course.serving.internal import InternalRequest
from minimind_course.serving.protocol import DetokenizeRequest, TokenizeRequest

router = APIRouter()


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, generation: Generation = Depends(get_generation)) -> dict[str, object]:
    """``{count, max_model_len, tokens}`` (and ``token_strs`` when asked); messages go through the chat template."""
    generation.check_model(body.model)
    engine = generation.engine
    if body.messages is not None:
        req = InternalRequest(SamplingParams(), messages=[m.for_template() for m in body.messages],
                              template_kwargs=dict(body.chat_template_kwargs or {}),
                              tools=[tool.model_dump(exclude_none=True) for tool in body.tools or []])
        tokens = engine.encode(generation.chat_prompt(req, add_generation_prompt=body.add_generation_prompt))
    else:
        tokens = engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens, verbose=False)
    answer: dict[str, object] = {"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens}
    if body.return_token_strs:
        answer["token_strs"] = engine.tokenizer.convert_ids_to_tokens(tokens)
    return answer


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, generation: Generation = Depends(get_generation)) -> dict[str, str]:
    """``{prompt}``: the text of the ids (special tokens included, as vLLM)."""
    generation.check_model(body.model)
    return {"prompt": generation.engine.tokenizer.decode(generation.prompt_ids(body.tokens, "tokens"))}
