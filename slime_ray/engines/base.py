"""The RolloutEngine contract: what every inference engine behind the Serve deployment does.

Request and response dicts follow SGLang's native ``/generate`` API so the SGLang adapter
is a thin mapping (https://docs.sglang.ai/basic_usage/native_api.html):

request (one per sequence)::

    {
      "input_ids": list[int],              # prompt token ids (or "text": str)
      "sampling_params": {
          "temperature": float, "top_p": float, "top_k": int,   # top_k -1 = off
          "max_new_tokens": int, "stop": list[str] | None,
          "stop_token_ids": list[int] | None, "seed": int | None,
      },
      "return_logprob": bool,
    }

response::

    {
      "text": str,                          # decoded output (for rewards / logging)
      "output_ids": list[int],              # response token ids exactly as sampled
      "output_log_probs": list[float],      # log p(token) at the sampling temperature, one per id
      "finish_reason": "stop" | "length" | "abort",
      "weight_version": int,                # version of the weights that produced every token
      "prompt_tokens": int, "completion_tokens": int,
    }

The rest of the code never asks which engine it has.
"""

from __future__ import annotations

import abc
from typing import Any

import torch


def default_sampling_params(**overrides: Any) -> dict[str, Any]:
    """SGLang-style sampling params with slime's defaults (T=1, top-p 1, top-k off)."""
    params = {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": -1,
        "max_new_tokens": 128,
        "stop": None,
        "stop_token_ids": None,
        "seed": None,
    }
    params.update({k: v for k, v in overrides.items() if v is not None})
    return params


def check_sampling_params(params: dict[str, Any]) -> None:
    """Refuse sampling params no engine can honour.

    Raises:
        ValueError: temperature < 0, top_p outside (0, 1], top_k 0 or < -1, max_new_tokens < 1
            (the HTTP routes answer it with status 400).
    """
    t, p = params.get("temperature", 1.0), params.get("top_p", 1.0)
    k, n = params.get("top_k", -1), params.get("max_new_tokens", 1)
    if t is not None and float(t) < 0:
        raise ValueError(f"sampling_params.temperature must be >= 0 (0 = greedy), got {t}")
    if p is not None and not 0 < float(p) <= 1:
        raise ValueError(f"sampling_params.top_p must be in (0, 1], got {p}")
    if k is not None and (int(k) == 0 or int(k) < -1):
        raise ValueError(f"sampling_params.top_k must be -1 (off) or >= 1, got {k}")
    if n is not None and int(n) < 1:
        raise ValueError(f"sampling_params.max_new_tokens must be >= 1, got {n}")


class StaleWeightsError(RuntimeError):
    """An engine was asked to serve while it holds older weights than the current version."""


class RolloutEngine(abc.ABC):
    """An inference engine: batched generation with log-probs, weight updates, versions.

    Implementations: :class:`slime_ray.engines.hf.HFEngine` (embedded transformers engine,
    the default) and the SGLang server adapter.
    """

    weight_version: int = 0

    @abc.abstractmethod
    def generate(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Generate for a batch of requests (see the module docstring for the dict fields).

        Returns one response dict per request, in order. All tokens of one response come
        from the same weights (``weight_version``).
        """

    @abc.abstractmethod
    def update_weights(self, named_tensors: dict[str, torch.Tensor], weight_version: int) -> None:
        """Replace the weights (HF parameter names -> tensors) and set ``weight_version``.

        Atomic with respect to ``generate``: no request sees a mix of old and new weights.

        Raises:
            KeyError: a name the model does not have.
            ValueError: a tensor whose shape does not match the model's.
        """

    def get_weights(self) -> dict[str, torch.Tensor]:
        """The engine's current weights by HF name (for tests that check sync)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its weights")

    def pause(self) -> None:
        """Stop starting new batches (in-flight ones finish)."""

    def resume(self) -> None:
        """Start serving again after :meth:`pause`."""

    def flush_cache(self) -> None:
        """Drop any cache keyed by tokens (prefix/KV cache)."""

    def abort(self, abort_all: bool = True) -> None:
        """Abort in-flight requests; they return with finish reason "abort"."""

    def release_memory(self) -> None:
        """Free accelerator memory (weights, KV) while the trainer runs (colocated mode)."""

    def resume_memory(self) -> None:
        """Take back what :meth:`release_memory` freed."""

    def health(self) -> dict[str, Any]:
        """``{"ok": bool, "weight_version": int, ...}``."""
        return {"ok": True, "weight_version": self.weight_version}
