"""OpenAI-compatible routes of the rollout ingress: ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions`` (``stream: true`` as server-sent events ending in ``data: [DONE]``).

The official ``openai`` client, curl and agent frameworks can drive the policy being trained::

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="policy", messages=[...], logprobs=True)

Chat prompts are rendered with the tokenizer's chat template (``add_generation_prompt``).
Besides the OpenAI schema (which has log-probs but no token ids), every choice carries the
extension fields ``token_ids`` (response ids as sampled), ``weight_version`` and
``engine_index``; chat responses also carry ``prompt_token_ids`` (completions: per choice).
Extra request fields (``extra_body`` in the client): ``top_k``, ``stop_token_ids``,
``session_id`` (also the ``X-Session-ID`` header) pins a multi-turn conversation to one engine.
``finish_reason`` is "stop", "length" or "abort" (the rollout was aborted; not in OpenAI's set).
Streaming: the engines generate whole batches, so the events are sent once the response is
complete (one chunk per token), not while the tokens are produced.

No ``from __future__ import annotations``: FastAPI must see the real ``Request`` type.
"""

import asyncio
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

fastapi_app = FastAPI(title="slime_ray rollout")

DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 512}  # OpenAI's default for completions is 16


class OpenAIRequestError(ValueError):
    """A request the OpenAI routes cannot serve (answered with status 400)."""


# --------------------------------------------------------------------------- request -> engine
def sampling_params_from_openai(body: dict[str, Any], kind: str) -> dict[str, Any]:
    """OpenAI sampling fields -> SGLang-style ``sampling_params`` (see ``engines/base.py``)."""
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS[kind]
    stop = body.get("stop")
    params = {
        "temperature": 1.0 if body.get("temperature") is None else float(body["temperature"]),
        "top_p": 1.0 if body.get("top_p") is None else float(body["top_p"]),
        "top_k": int(body.get("top_k") or -1),
        "max_new_tokens": int(max_tokens),
        "stop": [stop] if isinstance(stop, str) else (list(stop) if stop else None),
        "stop_token_ids": body.get("stop_token_ids"),
        "seed": body.get("seed"),
    }
    if params["max_new_tokens"] < 1:
        raise OpenAIRequestError(f"max_tokens must be >= 1, got {params['max_new_tokens']}")
    from slime_ray.engines.base import check_sampling_params

    try:
        check_sampling_params(params)
    except ValueError as err:
        raise OpenAIRequestError(str(err).replace("sampling_params.", "")) from None
    return params


def _message_text(content: Any) -> str:
    """A message's content as text (a list of parts keeps its text parts)."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]], tools: list | None = None) -> list[int]:
    """Render ``messages`` with the chat template (generation prompt added) and tokenize.

    Raises:
        OpenAIRequestError: no messages, or the tokenizer has no chat template.
    """
    if not messages or not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise OpenAIRequestError("messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    if not getattr(tokenizer, "chat_template", None):
        raise OpenAIRequestError("the model's tokenizer has no chat template; use /v1/completions")
    msgs = [{**m, "content": _message_text(m.get("content"))} for m in messages]
    text = tokenizer.apply_chat_template(msgs, tools=tools, add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(text, add_special_tokens=False))


def completion_prompt_ids(tokenizer: Any, prompt: Any) -> list[list[int]]:
    """``prompt`` (str, list[str], list[int] or list[list[int]]) -> one id list per prompt.

    Raises:
        OpenAIRequestError: an empty or malformed prompt.
    """
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt:
        prompts = prompt
    else:
        raise OpenAIRequestError("prompt must be a string, a list of strings or a list of token ids")
    out = []
    for p in prompts:
        ids = list(tokenizer.encode(p)) if isinstance(p, str) else [int(t) for t in p]
        if not ids:
            raise OpenAIRequestError("empty prompt")
        out.append(ids)
    return out


# --------------------------------------------------------------------------- engine -> response
def trim_at_stop(text: str, stop: list[str] | None) -> str:
    """Cut ``text`` before the first stop string (OpenAI leaves the stop sequence out)."""
    cut = min((text.find(s) for s in stop or [] if s and s in text), default=-1)
    return text if cut < 0 else text[:cut]


def _token_strs(tokenizer: Any, ids: list[int]) -> list[str]:
    return [tokenizer.decode([t]) for t in ids]


def chat_logprobs(tokenizer: Any, ids: list[int], lps: list[float]) -> dict[str, Any]:
    """OpenAI chat ``logprobs`` block (no alternatives: ``top_logprobs`` is empty)."""
    return {"content": [{"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": []}
                        for s, lp in zip(_token_strs(tokenizer, ids), lps)], "refusal": None}


def completion_logprobs(tokenizer: Any, ids: list[int], lps: list[float]) -> dict[str, Any]:
    """OpenAI (legacy) completions ``logprobs`` block."""
    toks = _token_strs(tokenizer, ids)
    offsets, pos = [], 0
    for s in toks:
        offsets.append(pos)
        pos += len(s)
    return {"tokens": toks, "token_logprobs": list(lps), "top_logprobs": None, "text_offset": offsets}


def _extension(out: dict[str, Any]) -> dict[str, Any]:
    meta = out.get("meta_info", {})
    return {"token_ids": out["output_ids"], "weight_version": out["weight_version"],
            "engine_index": meta.get("engine_index")}


def _usage(outs: list[dict[str, Any]], prompt_tokens: int) -> dict[str, int]:
    completion = sum(o["completion_tokens"] for o in outs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def chat_response(tokenizer: Any, model: str, prompt_ids: list[int], outs: list[dict[str, Any]],
                  stop: list[str] | None, logprobs: bool) -> dict[str, Any]:
    """A ``chat.completion`` object for the engine responses ``outs`` (one per choice)."""
    choices = []
    for i, out in enumerate(outs):
        choices.append({
            "index": i,
            "message": {"role": "assistant", "content": trim_at_stop(out["text"], stop)},
            "logprobs": chat_logprobs(tokenizer, out["output_ids"], out["output_log_probs"]) if logprobs else None,
            "finish_reason": out["finish_reason"],
            **_extension(out),
        })
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": _usage(outs, len(prompt_ids)),
            "prompt_token_ids": prompt_ids}


def completion_response(tokenizer: Any, model: str, prompts: list[list[int]], outs: list[dict[str, Any]],
                        n: int, stop: list[str] | None, logprobs: bool, echo: bool) -> dict[str, Any]:
    """A ``text_completion`` object; choice ``k`` answers prompt ``k // n``."""
    choices = []
    for k, out in enumerate(outs):
        prompt = prompts[k // n]
        text = trim_at_stop(out["text"], stop)
        choices.append({
            "index": k,
            "text": (tokenizer.decode(prompt) + text) if echo else text,
            "logprobs": completion_logprobs(tokenizer, out["output_ids"], out["output_log_probs"]) if logprobs
            else None,
            "finish_reason": out["finish_reason"],
            "prompt_token_ids": prompt,
            **_extension(out),
        })
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": _usage(outs, sum(len(p) for p in prompts) * n)}


def _deltas(tokenizer: Any, ids: list[int], final_text: str) -> list[str]:
    """Per-token text increments whose concatenation is ``final_text`` (stop string trimmed)."""
    deltas, prev = [], 0
    for k in range(1, len(ids) + 1):
        cur = min(len(tokenizer.decode(ids[:k], skip_special_tokens=True)), len(final_text))
        deltas.append(final_text[prev:cur] if cur > prev else "")
        prev = max(prev, cur)
    if prev < len(final_text):
        deltas.append(final_text[prev:])
    return deltas


def chat_stream_events(tokenizer: Any, model: str, prompt_ids: list[int], outs: list[dict[str, Any]],
                       stop: list[str] | None, logprobs: bool, include_usage: bool) -> list[str]:
    """``chat.completion.chunk`` server-sent events for complete responses, then ``[DONE]``."""
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": choices, **extra}
        return f"data: {json.dumps(chunk)}\n\n"

    events = []
    for i, out in enumerate(outs):
        ids, lps = out["output_ids"], out["output_log_probs"]
        events.append(event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]))
        for k, delta in enumerate(_deltas(tokenizer, ids, trim_at_stop(out["text"], stop))):
            lp = chat_logprobs(tokenizer, ids[k:k + 1], lps[k:k + 1]) if logprobs and k < len(lps) else None
            events.append(event([{"index": i, "delta": {"content": delta}, "logprobs": lp, "finish_reason": None}]))
        events.append(event([{"index": i, "delta": {}, "logprobs": None, "finish_reason": out["finish_reason"],
                              **_extension(out)}]))
    if include_usage:
        events.append(event([], usage=_usage(outs, len(prompt_ids))))
    events.append("data: [DONE]\n\n")
    return events


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                   "code": None}}, status_code=status)


def _session_id(body: dict[str, Any], http_request: Request) -> Any:
    return (body.get("session_id") or http_request.headers.get("x-session-id")
            or http_request.headers.get("x-smg-routing-key"))


# --------------------------------------------------------------------------- ingress mixin
class OpenAIRoutes:
    """Mixin of the rollout ingress: needs ``self.tokenizer``, ``self.model_name`` and
    ``async self.generate(request) -> response with meta_info`` (see ``rollout_app.py``)."""

    async def _generate_n(self, ids: list[int], params: dict[str, Any], n: int, session_id: Any) -> list[dict]:
        reqs = [{"input_ids": ids, "sampling_params": dict(params), "return_logprob": True,
                 "session_id": session_id} for _ in range(n)]
        return list(await asyncio.gather(*(self.generate(r) for r in reqs)))

    @fastapi_app.get("/v1/models")
    async def http_models(self):
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "slime_ray"}]}

    @fastapi_app.post("/v1/chat/completions")
    async def http_chat_completions(self, http_request: Request):
        body = await http_request.json()
        try:
            params = sampling_params_from_openai(body, "chat")
            ids = chat_prompt_ids(self.tokenizer, body.get("messages") or [], body.get("tools"))
            n = int(body.get("n") or 1)
            outs = await self._generate_n(ids, params, n, _session_id(body, http_request))
        except ValueError as err:
            return _error(str(err))
        model, logprobs = body.get("model") or self.model_name, bool(body.get("logprobs"))
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            events = chat_stream_events(self.tokenizer, model, ids, outs, params["stop"], logprobs, usage)
            return StreamingResponse(iter(events), media_type="text/event-stream")
        return chat_response(self.tokenizer, model, ids, outs, params["stop"], logprobs)

    @fastapi_app.post("/v1/completions")
    async def http_completions(self, http_request: Request):
        body = await http_request.json()
        if body.get("stream"):
            return _error("stream is supported on /v1/chat/completions only")
        try:
            params = sampling_params_from_openai(body, "completion")
            prompts = completion_prompt_ids(self.tokenizer, body.get("prompt"))
            n = int(body.get("n") or 1)
            sid = _session_id(body, http_request)
            groups = await asyncio.gather(*(self._generate_n(p, params, n, sid) for p in prompts))
        except ValueError as err:
            return _error(str(err))
        outs = [o for g in groups for o in g]
        return completion_response(self.tokenizer, body.get("model") or self.model_name, prompts, outs, n,
                                   params["stop"], body.get("logprobs") is not None, bool(body.get("echo")))
