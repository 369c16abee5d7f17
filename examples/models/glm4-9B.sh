# THUDM/GLM-4-9B-0414 (qkv bias, partial rotary 0.5, untied embeddings).
# Values from the model's public config.json; `source` this file and pass "${MODEL_ARGS[@]}".
# NOTE: GLM4 also has post-attention / post-MLP norms and interleaved rotary (slime passes
# --spec slime_plugins.models.glm4 get_glm_spec --post-self-attn-layernorm --post-mlp-layernorm
# --rotary-interleaved). slime_ray's megatron backend does not build or convert GLM4 yet, and
# those flags are not accepted; the arguments below describe the shared dimensions only.
MODEL_ARGS=(
   --swiglu
   --num-layers 40
   --hidden-size 4096
   --ffn-hidden-size 13696
   --num-attention-heads 32
   --group-query-attention
   --num-query-groups 2
   --kv-channels 128
   --use-rotary-position-embeddings
   --disable-bias-linear
   --add-qkv-bias
   --normalization RMSNorm
   --norm-epsilon 1e-5
   --rotary-base 10000
   --rotary-percent 0.5
   --vocab-size 151552
   --untie-embeddings-and-output-weights
)
