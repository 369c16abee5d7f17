"""Token-in / token-out helpers for generate functions (single- and multi-turn).

A custom generate function (``--custom-generate-function-path``, slime's signature
``async def generate(args, sample, sampling_params) -> Sample | list[Sample]``) reaches the
engines through :func:`engine_generate` and grows its :class:`~slime_ray.types.Sample` with
:func:`append_engine_output` (model tokens: loss mask 1, the engine's log-probs) and
:func:`append_tool_tokens` (tool / observation tokens: loss mask 0, log-prob 0.0)::

    from slime_ray.rollout.multi_turn import (append_engine_output, append_tool_tokens,
                                              encode_text, engine_generate, remaining_budget)

    async def generate(args, sample, sampling_params):
        for _ in range(args.max_turns):
            params = {**sampling_params, "max_new_tokens": remaining_budget(args, sample)}
            out = await engine_generate(args, sample.tokens, params, session_id=sample.session_id)
            append_engine_output(sample, out)
            if sample.status != SampleStatus.COMPLETED or not needs_tool(out["text"]):
                return sample
            append_tool_tokens(sample, encode_text(args, run_tool(out["text"])))
        return sample

The engine's output ids are appended exactly as sampled: they are never decoded and
re-encoded (decode + encode is not the identity for BPE tokenizers, and re-encoded ids would
not match the log-probs the engine sampled them with). Only the tool's text, which the model
did not produce, is encoded.
"""

from __future__ import annotations

import functools
from typing import Any

from slime_ray.types import Sample, SampleStatus


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def get_tokenizer(args: Any) -> Any:
    """The tokenizer of ``args.hf_checkpoint`` (loaded once per process)."""
    path = getattr(args, "hf_checkpoint", None)
    if not path:
        raise ValueError("no tokenizer: --hf-checkpoint is not set")
    return _load_tokenizer(str(path))


def encode_text(args: Any, text: str) -> list[int]:
    """Token ids of ``text`` (no special tokens added), for tool / observation text."""
    return list(get_tokenizer(args)(text, add_special_tokens=False)["input_ids"])


async def engine_generate(args: Any, input_ids: list[int], sampling_params: dict[str, Any], *,
                          session_id: str | None = None, client: Any = None) -> dict[str, Any]:
    """One engine call on token ids (routed to the session's replica when ``session_id`` is set).

    Args:
        args: the job's args (unused by the default client; kept for slime's call shape).
        input_ids: the full context, ``list[int]`` (prompt + response so far).
        sampling_params: SGLang-style params (``max_new_tokens`` in tokens).
        session_id: routing key keeping a multi-turn session on one replica (prefix cache).
        client: an engine client; default :func:`slime_ray.rollout.manager.get_engine_client`.

    Returns:
        The engine response: ``text``, ``output_ids``, ``output_log_probs``,
        ``finish_reason`` ("stop" / "length" / "abort"), ``weight_version``.
    """
    if client is None:
        from slime_ray.rollout.manager import get_engine_client

        client = get_engine_client()
    request: dict[str, Any] = {"input_ids": list(input_ids), "sampling_params": dict(sampling_params),
                               "return_logprob": True}
    if session_id is not None:
        request["session_id"] = session_id
    return await client.generate(request)


def append_engine_output(sample: Sample, out: dict[str, Any]) -> None:
    """Append an engine response to ``sample``: ids as returned, mask 1, the engine's log-probs.

    Sets ``sample.status`` from the finish reason and records the response's weight version
    (only when it produced tokens, so an abort before the first token adds no version).
    """
    ids = list(out.get("output_ids") or [])
    lps = list(out.get("output_log_probs") or [])
    if len(lps) != len(ids):
        raise ValueError(f"engine returned {len(ids)} ids but {len(lps)} log-probs; request return_logprob=True")
    sample.append_response_tokens(ids, lps, trainable=True,
                                  weight_version=out.get("weight_version") if ids else None,
                                  text=out.get("text", ""))
    sample.status = SampleStatus.from_finish_reason(out.get("finish_reason", "stop"))


def append_tool_tokens(sample: Sample, token_ids: list[int], text: str = "") -> None:
    """Append tool / observation tokens: loss mask 0 and log-prob 0.0 on each."""
    sample.append_response_tokens(list(token_ids), None, trainable=False, text=text)


def remaining_budget(args: Any, sample: Sample, max_response_len: int | None = None) -> int:
    """Response tokens still allowed: ``--rollout-max-response-len`` minus what ``sample`` holds.

    Tool tokens count against the budget too (they occupy the same context).
    """
    limit = max_response_len if max_response_len is not None else args.rollout_max_response_len
    return max(0, int(limit) - sample.response_length)
