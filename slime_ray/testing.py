"""Tiny randomly initialised models for tests and demos, built offline from a config.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained in-process on a
small arithmetic corpus, and the model is a 2-layer Llama with random weights. Both are
saved as a regular HF folder, so every code path that loads ``--hf-checkpoint`` (engines,
trainer) is exercised exactly as with a real model.
"""

from __future__ import annotations

import os
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "What is {a} + {b}? The answer is {c}.",
    "Compute {a} * {b}. Put the final answer in \\boxed{{{c}}}.",
    "Tom has {a} apples and buys {b} more. How many apples does he have now? {c}",
    "system user assistant tool You are a helpful math assistant.",
]


def build_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ChatML special tokens.

    Special tokens: ``<|endoftext|>`` (id 0, pad), ``<|im_start|>`` (1), ``<|im_end|>``
    (2, eos). Deterministic for a given ``vocab_size``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [
        t.format(a=a, b=b, c=a + b) for t in _CORPUS for a in range(0, 30, 3) for b in range(0, 30, 7)
    ]
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model_dir(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = True,
) -> Path:
    """Save a tiny random Llama (fp32) and its tokenizer as an HF folder at ``path``.

    The model has the SmolLM2 family's layout (RMSNorm, SwiGLU, RoPE, GQA, tied
    embeddings) at toy size: ~100k parameters with the default arguments.

    Returns:
        The folder, loadable with ``AutoModelForCausalLM.from_pretrained``.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def trainer_log_probs(model, prompt_ids: list[int], output_ids: list[int], temperature: float):
    """Trainer-style reference log-probs of a response: one forward on prompt + response, the
    logits at the previous position divided by ``temperature``, float32 ``log_softmax`` of the
    emitted token. Returns a ``[R]`` float32 tensor (R = len(output_ids)); what engine log-probs
    are checked against in the tests."""
    import torch

    ids = torch.tensor([prompt_ids + output_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1: -1].float() / temperature  # [R, V]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(output_ids)[:, None]).squeeze(-1)


def engine_request(engine, text: str, **sampling_params) -> dict:
    """A generate request of ``text`` (tokenized by ``engine.tokenizer``) asking for log-probs."""
    return {"input_ids": engine.tokenizer.encode(text), "sampling_params": sampling_params,
            "return_logprob": True}
