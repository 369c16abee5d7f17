"""HF <-> Megatron-core weight conversion for dense Llama / Qwen2 / Qwen3 models.

Pure functions on tensors and state dicts: no megatron import, no torch.distributed, so the
conversion is testable anywhere. :mod:`slime_ray.train.backends.megatron` wires them to a live
``GPTModel`` (with a TP all-gather as ``gather_fn``).

Megatron layout (local spec; the TE spec fuses the norms into the next linear, see
:func:`te_name`), per layer ``i`` under ``decoder.layers.{i}.``:

- ``self_attention.linear_qkv.weight`` [G*(Q/G+2)*d, H]: for each query group g in order, the
  group's Q/G query heads, then its key head, then its value head (d = kv_channels). Column
  parallel: TP rank r holds groups [r*G/tp, (r+1)*G/tp), i.e. a contiguous dim-0 chunk.
- ``self_attention.linear_qkv.bias`` (Qwen2): same layout without H.
- ``self_attention.q_layernorm.weight`` / ``k_layernorm.weight`` [d] (Qwen3): replicated.
- ``self_attention.linear_proj.weight`` [H, Q*d]: row parallel (dim-1 chunks).
- ``mlp.linear_fc1.weight`` [2F, H]: ``[gate; up]``; column parallel per half, so TP rank r holds
  ``[gate_r; up_r]`` (not a contiguous chunk of the full tensor).
- ``mlp.linear_fc2.weight`` [H, F]: row parallel.
- ``input_layernorm.weight``, ``pre_mlp_layernorm.weight`` [H]: replicated.

plus ``embedding.word_embeddings.weight`` [Vp, H] and (untied) ``output_layer.weight`` [Vp, H],
vocab parallel (dim-0 chunks), Vp = vocab padded to a multiple of
``make_vocab_size_divisible_by * tp`` (padding rows are zero and dropped on the way back), and
``decoder.final_layernorm.weight`` [H].

Notation: H hidden, F ffn hidden, Q attention heads, G query groups (KV heads), d head dim,
V vocab, Vp padded vocab, tp tensor-parallel size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128, tp: int = 1) -> int:
    """Megatron's padded vocabulary: the next multiple of ``divisible_by * tp`` (>= vocab_size)."""
    m = make_vocab_size_divisible_by * tp
    return int(math.ceil(vocab_size / m) * m)


def hf_rope_theta(hf_config: Any) -> float:
    """RoPE base of an HF config (``rope_parameters`` in transformers >= 5, ``rope_theta`` before)."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(hf_config, "rope_theta", 10000.0))


def hf_rope_type(hf_config: Any) -> str:
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    return str(params.get("rope_type", params.get("type", "default"))) if isinstance(params, dict) else "default"


@dataclass(frozen=True)
class ModelSpec:
    """The architecture numbers the conversion needs (built from an HF config).

    Fields are Megatron's names: ``num_query_groups`` = HF ``num_key_value_heads``,
    ``kv_channels`` = HF ``head_dim``, ``ffn_hidden_size`` = HF ``intermediate_size``.
    """

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    padded_vocab_size: int
    tie_embeddings: bool
    qkv_bias: bool
    qk_layernorm: bool
    norm_epsilon: float
    rotary_base: float
    max_position_embeddings: int

    @classmethod
    def from_hf_config(cls, hf_config: Any, make_vocab_size_divisible_by: int = 128, tp: int = 1) -> "ModelSpec":
        """Spec of an HF ``PretrainedConfig`` of a supported family.

        Raises:
            NotImplementedError: an unsupported ``model_type``, MoE, rope scaling or biased MLPs.
        """
        mt = getattr(hf_config, "model_type", "")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise NotImplementedError(
                f"the megatron backend converts {SUPPORTED_MODEL_TYPES} models; got model_type={mt!r}")
        if hf_rope_type(hf_config) != "default":
            raise NotImplementedError(f"rope scaling {hf_rope_type(hf_config)!r} is not supported yet")
        if getattr(hf_config, "mlp_bias", False):
            raise NotImplementedError("MLP biases are not supported (--disable-bias-linear is assumed)")
        if getattr(hf_config, "hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act={hf_config.hidden_act!r}: only SwiGLU (silu) is supported")
        heads = hf_config.num_attention_heads
        groups = getattr(hf_config, "num_key_value_heads", None) or heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        return cls(
            num_layers=hf_config.num_hidden_layers, hidden_size=hf_config.hidden_size,
            ffn_hidden_size=hf_config.intermediate_size, num_attention_heads=heads,
            num_query_groups=groups, kv_channels=head_dim, vocab_size=hf_config.vocab_size,
            padded_vocab_size=padded_vocab_size(hf_config.vocab_size, make_vocab_size_divisible_by, tp),
            tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            qkv_bias=mt == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
            qk_layernorm=mt == "qwen3",
            norm_epsilon=float(hf_config.rms_norm_eps), rotary_base=hf_rope_theta(hf_config),
            max_position_embeddings=int(getattr(hf_config, "max_position_embeddings", 4096)),
        )

    def check_tp(self, tp: int) -> None:
        """Raise ValueError when the model cannot be split ``tp`` ways (the message names the field)."""
        for field, value in (("num_attention_heads", self.num_attention_heads),
                             ("num_query_groups", self.num_query_groups),
                             ("ffn_hidden_size", self.ffn_hidden_size),
                             ("padded_vocab_size", self.padded_vocab_size)):
            if value % tp:
                raise ValueError(f"--tensor-model-parallel-size {tp} does not divide {field}={value}")


# ---------------------------------------------------------------------------------------- names
_LAYER = "decoder.layers.{i}."


def megatron_param_names(spec: ModelSpec) -> list[str]:
    """Megatron (local spec) parameter names of the model, in module order."""
    names = ["embedding.word_embeddings.weight"]
    for i in range(spec.num_layers):
        p = _LAYER.format(i=i)
        names.append(p + "input_layernorm.weight")
        names.append(p + "self_attention.linear_qkv.weight")
        if spec.qkv_bias:
            names.append(p + "self_attention.linear_qkv.bias")
        if spec.qk_layernorm:
            names += [p + "self_attention.q_layernorm.weight", p + "self_attention.k_layernorm.weight"]
        names += [p + "self_attention.linear_proj.weight", p + "pre_mlp_layernorm.weight",
                  p + "mlp.linear_fc1.weight", p + "mlp.linear_fc2.weight"]
    names.append("decoder.final_layernorm.weight")
    if not spec.tie_embeddings:
        names.append("output_layer.weight")
    return names


def te_name(name: str) -> str:
    """Local-spec name -> Transformer Engine spec name (norms fused into the next linear)."""
    return (name.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
                .replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"))


def local_name(name: str) -> str:
    """Inverse of :func:`te_name` (identity on local-spec names)."""
    return (name.replace("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight")
                .replace("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"))


def _split_layer(name: str) -> tuple[int | None, str]:
    if name.startswith("decoder.layers."):
        rest = name[len("decoder.layers."):]
        i, _, sub = rest.partition(".")
        return int(i), sub
    return None, name


_HF_SIMPLE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
}


def hf_names_of(name: str, spec: ModelSpec) -> list[str]:
    """HF parameter names a Megatron parameter is made of (e.g. q, k, v for ``linear_qkv``)."""
    i, sub = _split_layer(local_name(name))
    if i is None:
        return {"embedding.word_embeddings.weight": ["model.embed_tokens.weight"],
                "decoder.final_layernorm.weight": ["model.norm.weight"],
                "output_layer.weight": ["lm_head.weight"]}[sub]
    p = f"model.layers.{i}."
    if sub in _HF_SIMPLE:
        return [p + _HF_SIMPLE[sub]]
    if sub.startswith("self_attention.linear_qkv."):
        kind = sub.rsplit(".", 1)[1]
        return [p + f"self_attn.{x}_proj.{kind}" for x in "qkv"]
    if sub == "mlp.linear_fc1.weight":
        return [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
    raise KeyError(f"no HF name for Megatron parameter {name!r}")


# ---------------------------------------------------------------------------------------- fuse
def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """HF q [Q*d, ...], k [G*d, ...], v [G*d, ...] -> Megatron qkv [G*(Q/G+2)*d, ...] (per group)."""
    g, d = spec.num_query_groups, spec.kv_channels
    per = spec.num_attention_heads // g
    rest = q.shape[1:]
    qkv = torch.cat([q.reshape(g, per * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1)
    return qkv.reshape(g * (per + 2) * d, *rest)


def unfuse_qkv(qkv: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`: Megatron qkv -> (q, k, v) in HF layout."""
    g, d = spec.num_query_groups, spec.kv_channels
    per = spec.num_attention_heads // g
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, (per + 2) * d, *rest)
    q, k, v = torch.split(grouped, [per * d, d, d], dim=1)
    return (q.reshape(g * per * d, *rest).contiguous(), k.reshape(g * d, *rest).contiguous(),
            v.reshape(g * d, *rest).contiguous())


def _pad_vocab(w: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    extra = spec.padded_vocab_size - w.shape[0]
    return torch.cat([w, w.new_zeros(extra, *w.shape[1:])]) if extra > 0 else w.clone()


def hf_to_megatron_param(name: str, hf: Mapping[str, torch.Tensor], spec: ModelSpec) -> torch.Tensor:
    """The full (TP=1 layout) Megatron tensor ``name`` built from the HF tensors in ``hf``.

    Raises:
        KeyError: an HF tensor it needs is missing from ``hf``.
    """
    parts = [hf[n] for n in hf_names_of(name, spec)]
    sub = _split_layer(local_name(name))[1]
    if sub in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return _pad_vocab(parts[0], spec)
    if sub.startswith("self_attention.linear_qkv."):
        return fuse_qkv(*parts, spec)
    if sub == "mlp.linear_fc1.weight":
        return torch.cat(parts, dim=0)
    return parts[0].clone()


def megatron_to_hf_param(name: str, full: torch.Tensor, spec: ModelSpec) -> list[tuple[str, torch.Tensor]]:
    """Split a full (TP=1 layout) Megatron tensor into its HF ``(name, tensor)`` pieces."""
    hf_names = hf_names_of(name, spec)
    sub = _split_layer(local_name(name))[1]
    if sub in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return [(hf_names[0], full[: spec.vocab_size].contiguous())]
    if sub.startswith("self_attention.linear_qkv."):
        return list(zip(hf_names, unfuse_qkv(full, spec)))
    if sub == "mlp.linear_fc1.weight":
        gate, up = torch.chunk(full, 2, dim=0)
        return [(hf_names[0], gate.contiguous()), (hf_names[1], up.contiguous())]
    return [(hf_names[0], full)]


def hf_to_megatron(hf_state: Mapping[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Whole HF state dict -> full (TP=1) Megatron state dict (local-spec names)."""
    return {n: hf_to_megatron_param(n, hf_state, spec) for n in megatron_param_names(spec)}


def megatron_to_hf(mg_state: Mapping[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Full (TP=1) Megatron state dict -> HF state dict (no ``lm_head`` when embeddings are tied)."""
    out: dict[str, torch.Tensor] = {}
    for n in megatron_param_names(spec):
        out.update(megatron_to_hf_param(n, mg_state[n], spec))
    return out


# ---------------------------------------------------------------------------------------- TP
def partition_kind(name: str) -> str:
    """How a parameter is split over TP: ``column`` (dim 0), ``glu`` (dim 0 per half),
    ``row`` (dim 1), ``vocab`` (dim 0 of the padded vocab) or ``replicated``."""
    sub = _split_layer(local_name(name))[1]
    if sub in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return "vocab"
    if sub.startswith("self_attention.linear_qkv."):
        return "column"
    if sub == "mlp.linear_fc1.weight":
        return "glu"
    if sub in ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight"):
        return "row"
    return "replicated"


def shard_param(name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """TP rank ``tp_rank``'s shard of the full (TP=1 layout) Megatron tensor ``name``."""
    kind = partition_kind(name)
    if tp_size == 1 or kind == "replicated":
        return full.clone()
    if kind in ("column", "vocab"):
        return torch.chunk(full, tp_size, dim=0)[tp_rank].clone()
    if kind == "row":
        return torch.chunk(full, tp_size, dim=1)[tp_rank].contiguous()
    gate, up = torch.chunk(full, 2, dim=0)
    return torch.cat([torch.chunk(gate, tp_size, 0)[tp_rank], torch.chunk(up, tp_size, 0)[tp_rank]])


def unshard_param(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`shard_param`: the full tensor from every TP rank's shard (rank order)."""
    kind = partition_kind(name)
    if len(shards) == 1 or kind == "replicated":
        return shards[0]
    if kind in ("column", "vocab"):
        return torch.cat(shards, dim=0)
    if kind == "row":
        return torch.cat(shards, dim=1)
    halves = [torch.chunk(s, 2, dim=0) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


def hf_to_megatron_shard(hf_state: Mapping[str, torch.Tensor], spec: ModelSpec, tp_rank: int,
                         tp_size: int) -> dict[str, torch.Tensor]:
    """HF state dict -> TP rank ``tp_rank``'s Megatron state dict (one full tensor at a time)."""
    spec.check_tp(tp_size)
    return {n: shard_param(n, hf_to_megatron_param(n, hf_state, spec), tp_rank, tp_size)
            for n in megatron_param_names(spec)}


def megatron_shards_to_hf(shards: list[Mapping[str, torch.Tensor]], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Every TP rank's Megatron state dict (rank order) -> HF state dict."""
    full = {n: unshard_param(n, [s[n] for s in shards]) for n in megatron_param_names(spec)}
    return megatron_to_hf(full, spec)


# ---------------------------------------------------------------------------------------- stream
def iter_hf_buckets(
    local_params: Iterable[tuple[str, torch.Tensor]],
    spec: ModelSpec,
    buffer_size: int,
    gather_fn: Callable[[str, torch.Tensor], list[torch.Tensor]] | None = None,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Stream HF-named weights in buckets of about ``buffer_size`` bytes.

    Args:
        local_params: ``(megatron_name, local_shard)`` pairs of this rank (local- or TE-spec
            names); each is gathered, unsharded and converted only when its turn comes, so at
            most one bucket plus one full parameter is held at a time.
        spec: the model's :class:`ModelSpec`.
        buffer_size: bytes per bucket (``--update-weight-buffer-size``); a bucket never exceeds
            it, except a single Megatron parameter larger than it, which makes its own bucket.
        gather_fn: ``(name, shard) -> [shard of each TP rank]`` (a TP all-gather); ``None`` means
            TP=1.

    Yields:
        Lists of ``(hf_name, tensor)``, detached CPU tensors, in model order.
    """
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, shard in local_params:
        shards = gather_fn(name, shard) if gather_fn is not None else [shard]
        full = unshard_param(name, [s.detach() for s in shards])
        pieces = [(n, t.to("cpu", copy=True)) for n, t in megatron_to_hf_param(name, full, spec)]
        nbytes = sum(t.numel() * t.element_size() for _, t in pieces)
        if bucket and size + nbytes > buffer_size:
            yield bucket
            bucket, size = [], 0
        bucket += pieces
        size += nbytes
    if bucket:
        yield bucket


# ---------------------------------------------------------------------------------------- MODEL_ARGS
def _flag_checks(hf_config: Any) -> list[tuple[str, Any, str]]:
    spec = ModelSpec.from_hf_config(hf_config)
    return [
        ("num-layers", spec.num_layers, "num_hidden_layers"),
        ("hidden-size", spec.hidden_size, "hidden_size"),
        ("ffn-hidden-size", spec.ffn_hidden_size, "intermediate_size"),
        ("num-attention-heads", spec.num_attention_heads, "num_attention_heads"),
        ("num-query-groups", spec.num_query_groups, "num_key_value_heads"),
        ("kv-channels", spec.kv_channels, "head_dim"),
        ("norm-epsilon", spec.norm_epsilon, "rms_norm_eps"),
        ("rotary-base", spec.rotary_base, "rope_theta"),
        ("vocab-size", spec.vocab_size, "vocab_size"),
        ("rotary-percent", float(getattr(hf_config, "partial_rotary_factor", 1.0) or 1.0), "partial_rotary_factor"),
    ]


_ARCH_FLAGS = ("num-layers", "hidden-size", "num-attention-heads")


def check_model_args(megatron_args: Mapping[str, Any], hf_config: Any) -> None:
    """Check slime-style ``MODEL_ARGS`` against the HF config of ``--hf-checkpoint``.

    Only flags that are present are compared; boolean flags (``--untie-embeddings-and-output-
    weights``, ``--qk-layernorm``, ``--add-qkv-bias``, ``--group-query-attention``) are compared
    both ways as soon as any architecture flag (``--num-layers``, ...) is given. With no
    architecture flags at all nothing is checked (the model is built from the HF config).

    Args:
        megatron_args: ``args.megatron_args`` (dash keys; values are strings, or True for flags).
        hf_config: a ``transformers.PretrainedConfig``.

    Raises:
        ValueError: naming every flag whose value disagrees with the HF config.
    """
    errors = []
    for flag, expected, hf_field in _flag_checks(hf_config):
        if flag not in megatron_args:
            continue
        given = megatron_args[flag]
        try:
            ok = math.isclose(float(given), float(expected), rel_tol=1e-9, abs_tol=0.0)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            errors.append(f"--{flag} {given} but the HF config has {hf_field}={expected}")
    if any(f in megatron_args for f in _ARCH_FLAGS):
        spec = ModelSpec.from_hf_config(hf_config)
        gqa = spec.num_query_groups != spec.num_attention_heads
        for flag, expected, why in (
            ("untie-embeddings-and-output-weights", not spec.tie_embeddings,
             f"tie_word_embeddings={spec.tie_embeddings}"),
            ("qk-layernorm", spec.qk_layernorm, f"model_type={hf_config.model_type!r}"),
            ("add-qkv-bias", spec.qkv_bias, f"qkv bias={spec.qkv_bias}"),
            ("group-query-attention", gqa, f"num_key_value_heads={spec.num_query_groups} of "
                                           f"{spec.num_attention_heads} heads"),
            ("swiglu", True, "hidden_act='silu' (SwiGLU)"),
        ):
            given = bool(megatron_args.get(flag, False))
            if flag == "group-query-attention" and given and not expected:
                continue  # harmless when every head is its own group
            if given != expected:
                errors.append(f"--{flag} is {'missing' if expected else 'given'} but the HF config has {why}")
        norm = megatron_args.get("normalization")
        if norm is not None and str(norm) != "RMSNorm":
            errors.append(f"--normalization {norm} but the HF model uses RMSNorm")
    if errors:
        raise ValueError("MODEL_ARGS disagree with the HF config of --hf-checkpoint:\n  " + "\n  ".join(errors))
