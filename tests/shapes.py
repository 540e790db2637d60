"""The tiny synthetic model shapes the tests share (plain data: test modules import it, not
conftest)."""

from __future__ import annotations

from cputune.model import synth

# Every quantized row is a multiple of QK_K = 256 long, so Q4_K_M keeps its K-quants. The exception
# is deepseek2's attn_k_b, whose rows are qk_nope_dim long (64 here, 128 in R1): llama-quantize's
# tensor_type_fallback() demotes it (src/llama-quant.cpp), as it does for the real R1.
TINY_LLAMA = synth.Shape("llama", n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=512, ctx=2048)
# One leading dense block, then one MoE block: 8 routed experts (top 2) and 1 shared, MLA attention.
TINY_DS2 = synth.Shape("deepseek2", 
    n_layer=2, n_embd=256, n_ff=512, n_dense_lead=1, n_expert=8, n_expert_used=2, n_expert_shared=1,
    n_ff_exp=256, n_head=4, q_lora_rank=256, kv_lora_rank=256, qk_nope_dim=64, qk_rope_dim=32, v_head_dim=64,
    n_vocab=512, ctx=2048)
TINY_QTYPES = ("q8_0", "q4_k_m")
# TINY_DS2 with DeepSeek's own MLA latent (kv_lora 512, rope 64: K 576, V 512), which ik_llama.cpp's
# loader requires; 7.6 MB in f16.
TINY_DS2_IK = TINY_DS2.replace(kv_lora_rank=512, qk_rope_dim=64)
IK_QTYPE = "iq4_ks"  # an ik_llama.cpp-only type (IQ4_KS, 4.25 bits), made by its own llama-quantize
