# meta-llama/Meta-Llama-3-8B (untied embeddings, no rope scaling; Llama 3.1 adds llama3 rope
# scaling, which the megatron backend does not support yet).
# Values from the model's public config.json; `source` this file and pass "${MODEL_ARGS[@]}".
MODEL_ARGS=(
   --swiglu
   --num-layers 32
   --hidden-size 4096
   --ffn-hidden-size 14336
   --num-attention-heads 32
   --group-query-attention
   --num-query-groups 8
   --kv-channels 128
   --use-rotary-position-embeddings
   --disable-bias-linear
   --normalization RMSNorm
   --norm-epsilon 1e-5
   --rotary-base 500000
   --vocab-size 128256
   --untie-embeddings-and-output-weights
)
