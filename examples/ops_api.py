"""The operator API on its own: flash-attn style functions on (batch, seq, heads, head_dim) tensors.

optimum_atb.ops picks the backend from the tensors' device (torch on CPU, Triton on CUDA, torch_npu on
Ascend). Each result is checked against plain PyTorch here; no model needed.
"""

import torch
import torch.nn.functional as F

import optimum_atb
from optimum_atb import ops

torch.manual_seed(0)
B, S, Hq, Hkv, D = 2, 37, 8, 2, 64
q, k, v = torch.randn(B, S, Hq, D), torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, D)

# Fused attention with grouped-query heads (K/V are never repeated in memory), causal.
out = ops.flash_attention(q, k, v, causal=True)
ref = F.scaled_dot_product_attention(
    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
).transpose(1, 2)
print(f"flash_attention max abs diff vs SDPA: {(out - ref).abs().max():.1e}")

# Paged KV cache: write K/V into a block pool through a slot mapping, then decode one token from it.
block_size, num_blocks = 16, 8
k_cache = torch.zeros(num_blocks, block_size, Hkv, D)
v_cache = torch.zeros(num_blocks, block_size, Hkv, D)
block_tables = torch.tensor([[5, 2, 7], [0, 3, 1]], dtype=torch.int32)  # scattered blocks per sequence
slots = torch.cat([block_tables[b].long().repeat_interleave(block_size)[:S] * block_size
                   + torch.arange(S) % block_size for b in range(B)])  # fmt: skip
ops.reshape_and_cache(k.reshape(B * S, Hkv, D), v.reshape(B * S, Hkv, D), k_cache, v_cache, slots)
context_lens = torch.full((B,), S, dtype=torch.int32)
q_last = q[:, -1:]  # the newest token of each sequence
paged = ops.paged_attention(q_last, k_cache, v_cache, block_tables, context_lens)
print(f"paged_attention max abs diff vs dense: {(paged - out[:, -1:]).abs().max():.1e}")

# Fused residual add + RMSNorm, as in a LLaMA decoder layer: returns (norm(x + residual), x + residual).
x, residual, weight = torch.randn(B, S, 576), torch.randn(B, S, 576), torch.rand(576)
normed, summed = ops.rms_norm(x, weight, 1e-5, residual=residual)
h = x + residual
ref_norm = weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
print(f"rms_norm(residual=) max abs diff: {(normed - ref_norm).abs().max():.1e}")

# SwiGLU on gate and up projections.
gate, up = torch.randn(B, S, 1536), torch.randn(B, S, 1536)
print(f"swiglu max abs diff: {(ops.swiglu(gate, up) - F.silu(gate) * up).abs().max():.1e}")

print("backend for CPU tensors:", optimum_atb.backends.resolve(q.device))
