"""A reward model as a Ray Serve application: scores (prompt, response) pairs.

``RewardModel`` (plain class) wraps a transformers ``AutoModelForSequenceClassification``:
the pair is rendered with the tokenizer's chat template (user prompt, assistant response)
when it has one, else as ``prompt + response``, and the reward is the logit ``score_index``
(0 for the usual one-label reward head) at the last token. ``RewardModelDeployment`` batches
concurrent pairs with ``@serve.batch`` into one forward pass.

Routes (under the app's route prefix, e.g. ``/rm``):

- ``POST /score`` ``{"prompt": str | messages, "response": str, "label": ...}`` ->
  ``{"reward": float}`` — the shape ``--rm-type remote_rm --rm-url http://127.0.0.1:8000/rm/score``
  sends and reads (:func:`slime_ray.rollout.rewards.remote_reward`);
  ``{"pairs": [{"prompt", "response"}, ...]}`` -> ``{"rewards": [float, ...]}``.
- handle: ``await handle.score.remote([{"prompt", "response"}, ...])`` -> list of floats.

Run alone::

    serve run serve_apps.reward_model_app:app model_path=/path/to/rm route_prefix=/rm

No ``from __future__ import annotations``: FastAPI must see the real ``Request`` type.
"""

import asyncio
import os
import threading
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RewardModel:
    """Sequence-classification reward model: ``score(pairs) -> list[float]``.

    Args:
        model_path: HF folder of an ``AutoModelForSequenceClassification`` model + tokenizer.
        dtype: "float32" | "bfloat16" | "float16".
        device: torch device string.
        score_index: which output logit is the reward.
        max_length: pairs are truncated to this many tokens (from the left, keeping the response).

    Raises:
        ValueError: an unknown dtype.
    """

    def __init__(self, model_path: str, *, dtype: str = "float32", device: str = "cpu", score_index: int = 0,
                 max_length: int = 4096):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if dtype not in _DTYPES:
            raise ValueError(f"RewardModel: dtype {dtype!r} is not one of {sorted(_DTYPES)}")
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=_DTYPES[dtype])
        self.model.config.pad_token_id = self.tokenizer.pad_token_id  # last non-pad token is scored
        self.model.to(self.device).eval()
        self.score_index = score_index
        self.max_length = max_length
        self._lock = threading.Lock()

    def render(self, prompt: Any, response: str) -> str:
        """The scored text of one pair (chat template when the tokenizer has one)."""
        if getattr(self.tokenizer, "chat_template", None):
            messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
            messages.append({"role": "assistant", "content": response})
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        prompt_text = prompt if isinstance(prompt, str) else "\n".join(m.get("content", "") for m in prompt)
        return prompt_text + response

    @torch.no_grad()
    def score(self, pairs: list[dict[str, Any]]) -> list[float]:
        """One reward per ``{"prompt", "response"}`` pair, in order (one batched forward pass).

        Raises:
            ValueError: a pair without ``prompt`` or ``response``.
        """
        if not pairs:
            return []
        bad = [i for i, p in enumerate(pairs) if "prompt" not in p or "response" not in p]
        if bad:
            raise ValueError(f"reward model: pairs {bad[:10]} need 'prompt' and 'response'")
        texts = [self.render(p["prompt"], p["response"] or "") for p in pairs]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                               max_length=self.max_length, add_special_tokens=False)
        with self._lock:
            logits = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits  # [B, num_labels]
        return [float(x) for x in logits[:, self.score_index].float().cpu()]


reward_api = FastAPI(title="slime_ray reward model")


@serve.deployment(max_ongoing_requests=1024)
@serve.ingress(reward_api)
class RewardModelDeployment:
    """The reward model as a Serve replica; concurrent pairs are scored in one batch.

    Args: see :class:`RewardModel`, plus ``max_batch_size`` (pairs per forward pass) and
    ``batch_wait_timeout_s`` (seconds a partial batch waits for more pairs).
    """

    def __init__(self, model_path: str, max_batch_size: int = 32, batch_wait_timeout_s: float = 0.01,
                 **model_kwargs: Any):
        self.model = RewardModel(model_path, **model_kwargs)
        self._score_batch.set_max_batch_size(max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _score_batch(self, pairs: list[dict[str, Any]]) -> list[float]:
        return await asyncio.to_thread(self.model.score, pairs)

    async def score(self, pairs: list[dict[str, Any]]) -> list[float]:
        """Rewards of ``pairs`` (each goes through the batcher with concurrent callers' pairs)."""
        return list(await asyncio.gather(*(self._score_batch(p) for p in pairs)))

    @reward_api.post("/score")
    async def http_score(self, http_request: Request):
        body = await http_request.json()
        try:
            if isinstance(body, dict) and "pairs" in body:
                return {"rewards": await self.score(list(body["pairs"]))}
            if not isinstance(body, dict) or "prompt" not in body or "response" not in body:
                raise ValueError("POST /score takes {'prompt', 'response'} or {'pairs': [...]}")
            return {"reward": await self._score_batch(body)}
        except ValueError as err:
            return JSONResponse({"error": str(err)}, status_code=400)

    @reward_api.get("/health")
    async def http_health(self):
        return {"ok": True}


_ARG_TYPES = {"dtype": str, "device": str, "score_index": int, "max_length": int, "max_batch_size": int,
              "batch_wait_timeout_s": float}


def build_reward_model_app(model_path: str, *, num_replicas: int = 1, num_cpus: float = 1, num_gpus: float = 0,
                           **kwargs: Any) -> serve.Application:
    """The reward-model app (``kwargs``: :class:`RewardModelDeployment` arguments)."""
    return RewardModelDeployment.options(
        num_replicas=num_replicas, ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
    ).bind(model_path, **kwargs)


def app_builder(args: dict[str, str]) -> serve.Application:
    """``serve run serve_apps.reward_model_app:app model_path=... [dtype=... num_replicas=2 ...]``.

    Raises:
        ValueError: no ``model_path`` or an unknown key.
    """
    args = dict(args)
    if "model_path" not in args:
        raise ValueError("reward model app: pass model_path=/path/to/sequence-classification/model")
    resources = {"num_replicas": int, "num_cpus": float, "num_gpus": float}
    unknown = set(args) - {"model_path"} - set(_ARG_TYPES) - set(resources)
    if unknown:
        raise ValueError(f"reward model app: unknown arguments {sorted(unknown)}")
    kwargs = {k: {**_ARG_TYPES, **resources}[k](v) for k, v in args.items() if k != "model_path"}
    return build_reward_model_app(os.path.expanduser(args["model_path"]), **kwargs)


app = app_builder
