"""Fused forwards of a converted model's modules, shared by every family (installed by ``to_atb``).

Each forward reads its settings from a plan stored on the module (``module._atb``), built once at
conversion, so the per-step work is the arithmetic plus a few attribute reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from optimum_atb import ops
from optimum_atb.attention import flash_attention_bshd
from optimum_atb.kernels.torch_ops import linear as cpu_linear

# Activations with a fused GLU kernel: config name -> (op, extra kwargs).
GLU_OPS: dict[str, tuple[Callable, dict]] = {
    "silu": (ops.swiglu, {}),
    "swish": (ops.swiglu, {}),
    "gelu_pytorch_tanh": (ops.geglu, {"approximate": "tanh"}),
    "gelu": (ops.geglu, {"approximate": "none"}),
}


def norm_eps(norm: nn.Module) -> float:
    """The epsilon of a transformers RMSNorm (Llama-style ``variance_epsilon`` or Gemma-style ``eps``)."""
    eps = getattr(norm, "variance_epsilon", None)
    return norm.eps if eps is None else eps


@dataclass
class DecoderPlan:
    eps: float
    offset: float


@dataclass
class AttentionPlan:
    head_dim: int
    split: tuple[int, int, int] | None  # q/k/v widths of a fused qkv_proj; None: separate projections
    rotary: bool
    attention: bool
    sliding_window: int | None
    softcap: float | None
    qk_norm: tuple[float, float] | None  # (eps, offset) when q/k norms run through ops.rms_norm
    apply_rotary_pos_emb: Callable  # the family's stock rotary function (used when rotary is not fused)
    eager_attention: Callable  # the family's stock eager attention (fallback of the interface lookup)


@dataclass
class MLPPlan:
    glu: Callable | None  # fused GLU op on cat(gate, up); None: the module's own activation
    glu_kwargs: dict


def linear_forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """A float32 CPU ``nn.Linear`` through the torch backend's ``linear`` (``weight @ x^T`` for 1-8 rows,
    ``F.linear`` otherwise); bound at conversion, so the per-call checks of ``ops.linear`` are skipped."""
    return cpu_linear(x=input, weight=self.weight, bias=self.bias)


def _norm(x: torch.Tensor, norm: nn.Module, plan: DecoderPlan, residual: torch.Tensor | None = None):
    return ops.rms_norm(x, norm.weight, plan.eps, residual=residual, offset=plan.offset)


def prenorm_decoder_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    cache=None,
    **kwargs,
) -> torch.Tensor:
    """Llama-style layer: ``h = x + attn(norm(x))``; ``h + mlp(norm(h))`` with the add fused into the norm."""
    plan: DecoderPlan = self._atb
    normed = _norm(hidden_states, self.input_layernorm, plan)
    attn, _ = self.self_attn(
        hidden_states=normed,
        attention_mask=attention_mask,
        position_embeddings=position_embeddings,
        cache=cache,
        **kwargs,
    )
    attn_dropout = getattr(self, "resid_attn_dropout", None)  # Phi3
    if attn_dropout is not None:
        attn = attn_dropout(attn)
    normed, hidden_states = _norm(attn, self.post_attention_layernorm, plan, residual=hidden_states)
    out = self.mlp(normed)
    mlp_dropout = getattr(self, "resid_mlp_dropout", None)
    if mlp_dropout is not None:
        out = mlp_dropout(out)
    return hidden_states + out


def sandwich_decoder_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    cache=None,
    **kwargs,
) -> torch.Tensor:
    """Gemma2-style layer: norms before and after attention and MLP; the residual add is fused into the
    pre-feedforward norm."""
    plan: DecoderPlan = self._atb
    normed = _norm(hidden_states, self.input_layernorm, plan)
    attn, _ = self.self_attn(
        hidden_states=normed,
        attention_mask=attention_mask,
        position_embeddings=position_embeddings,
        cache=cache,
        **kwargs,
    )
    attn = _norm(attn, self.post_attention_layernorm, plan)
    normed, hidden_states = _norm(attn, self.pre_feedforward_layernorm, plan, residual=hidden_states)
    out = _norm(self.mlp(normed), self.post_feedforward_layernorm, plan)
    return hidden_states + out


def attention_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    cache=None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention with one QKV matmul, one rotary call on q and k, and ``ops.flash_attention``.

    Works in the (B, S, H, D) layout throughout; the cache gets (B, H, S, D) views. A paged cache
    (``cache.is_atb_paged``) owns both the write and the attention.
    """
    plan: AttentionPlan = self._atb
    bsz, seq = hidden_states.shape[:2]
    if plan.split is not None:
        q, k, v = self.qkv_proj(hidden_states).split(plan.split, dim=-1)
    else:
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    q = q.view(bsz, seq, -1, plan.head_dim)
    k = k.view(bsz, seq, -1, plan.head_dim)
    v = v.view(bsz, seq, -1, plan.head_dim)
    if plan.qk_norm is not None:
        eps, offset = plan.qk_norm
        q = ops.rms_norm(q, self.q_norm.weight, eps, offset=offset)
        k = ops.rms_norm(k, self.k_norm.weight, eps, offset=offset)
    elif hasattr(self, "q_norm"):
        q, k = self.q_norm(q), self.k_norm(k)
    cos, sin = position_embeddings
    if plan.rotary:
        q, k = ops.apply_rotary(q, k, cos, sin)
    else:
        q, k = plan.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    dropout = self.attention_dropout if self.training else 0.0

    if getattr(cache, "is_atb_paged", False):
        out = cache.paged_attention_forward(
            layer_idx=self.layer_idx,
            query=q,
            key=k,
            value=v,
            attention_mask=attention_mask,
            scaling=self.scaling,
            sliding_window=plan.sliding_window,
            softcap=plan.softcap,
        )
    else:
        if cache is not None:
            k, v = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx, kwargs=kwargs)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        if plan.attention:
            out = flash_attention_bshd(
                self,
                q,
                k,
                v,
                attention_mask,
                scaling=self.scaling,
                dropout=dropout,
                sliding_window=plan.sliding_window,
                softcap=plan.softcap,
                is_causal=kwargs.get("is_causal"),
            )
        else:
            out = _stock_attention(self, plan, q, k, v, attention_mask, dropout, kwargs)
    return self.o_proj(out.reshape(bsz, seq, -1)), None


def _stock_attention(self, plan: AttentionPlan, q, k, v, attention_mask, dropout, kwargs) -> torch.Tensor:
    """The model's configured attention implementation, called as the stock module calls it."""
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, plan.eager_attention)
    extra = {}
    if plan.sliding_window is not None:
        extra["sliding_window"] = plan.sliding_window
    if plan.softcap is not None:
        extra["softcap"] = plan.softcap
    out, _ = interface(
        self,
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attention_mask,
        dropout=dropout,
        scaling=self.scaling,
        **extra,
        **kwargs,
    )
    return out


def mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` with one gate/up matmul (when fused) and a fused GLU."""
    plan: MLPPlan = self._atb
    if hasattr(self, "gate_up_proj"):
        gate, up = self.gate_up_proj(x), None  # cat(gate, up), as the GLU ops take it
    else:  # quantized models keep gate and up as separate matmuls
        gate, up = self.gate_proj(x), self.up_proj(x)
    if plan.glu is not None:
        return self.down_proj(plan.glu(gate, up, **plan.glu_kwargs))
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    act = getattr(self, "act_fn", None) or self.activation_fn
    return self.down_proj(act(gate) * up)
