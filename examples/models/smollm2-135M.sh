# HuggingFaceTB/SmolLM2-135M (Llama architecture, tied embeddings).
# Values from the model's public config.json; `source` this file and pass "${MODEL_ARGS[@]}".
MODEL_ARGS=(
   --swiglu
   --num-layers 30
   --hidden-size 576
   --ffn-hidden-size 1536
   --num-attention-heads 9
   --group-query-attention
   --num-query-groups 3
   --kv-channels 64
   --use-rotary-position-embeddings
   --disable-bias-linear
   --normalization RMSNorm
   --norm-epsilon 1e-5
   --rotary-base 100000
   --vocab-size 49152
)
