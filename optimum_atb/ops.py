"""Public fused operators, flash-attn style: (batch, seq, heads, head_dim) layout.

Every operator validates its inputs here (a ``ValueError`` naming the problem, raised before anything
is written), resolves defaults, then calls the implementation of the backend chosen for the tensors'
device (see :mod:`optimum_atb.backends`). Backend implementations receive exactly these keyword
arguments, already validated, with ``scale`` resolved to a float.

Masking conventions shared by every backend (and by the float64 reference in ``kernels/reference.py``):

* Positions are aligned bottom-right: query row ``i`` of a sequence with ``Sq`` queries and ``Sk`` keys
  sits at absolute position ``i + Sk - Sq``.
* ``causal``: query at position ``p`` sees keys ``j <= p``.
* ``sliding_window=W``: query at position ``p`` sees keys ``j > p - W`` (W keys including itself),
  as transformers' ``sliding_window_overlay``.
* ``alibi_slopes`` [Hq] or [B, Hq]: adds ``-slope * |p - j|`` to the scaled score.
* ``softcap=c``: score <- ``c * tanh(score / c)`` after scaling, before bias and mask (Gemma2).
* ``attn_mask``: optional bool, broadcastable to [B, Hq, Sq, Sk], True = attend (transformers' polarity).
* A query row that sees no key returns zeros (and ``lse = -inf``).
"""

from __future__ import annotations

import torch

from . import _validate as V
from .backends import resolve
from .kernels.dispatch import get_kernel


def _run(op: str, device: torch.device, **kwargs):
    return get_kernel(op, resolve(device))(**kwargs)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    sliding_window: int | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    attn_mask: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
):
    """Attention over q [B,Sq,Hq,D], k/v [B,Sk,Hkv,D] (Hq % Hkv == 0, K/V never repeated in memory).

    Varlen (packed) mode: q [Tq,Hq,D], k/v [Tk,Hkv,D] with int32 ``cu_seqlens_q``/``cu_seqlens_k`` [B+1].
    Returns ``out`` shaped like q, or ``(out, lse)`` with lse [B,Hq,Sq] (varlen: [Hq,Tq]) in float32.
    head_dim up to 256; fp32/fp16/bf16; differentiable.
    """
    scale = V.check_flash_attention(
        q, k, v, scale, sliding_window, alibi_slopes, softcap, attn_mask,
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
    )  # fmt: skip
    return _run(
        "flash_attention", q.device, q=q, k=k, v=v, causal=causal, scale=scale,
        sliding_window=sliding_window, alibi_slopes=alibi_slopes, softcap=softcap, attn_mask=attn_mask,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, dropout_p=dropout_p, return_lse=return_lse,
    )  # fmt: skip


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Attention of q [B,Sq,Hq,D] over a paged KV pool k/v_cache [num_blocks, block_size, Hkv, D].

    ``block_tables`` int32 [B, max_blocks]; ``context_lens`` int32 [B]: keys per sequence, the Sq new
    tokens included (they must already be written, see :func:`reshape_and_cache`). Key ``t`` of sequence
    ``b`` lives at ``cache[block_tables[b, t // block_size], t % block_size]``; table entries past a
    sequence's last block and slots past its context are never read. With Sq > 1 the new tokens are
    causal among themselves (speculative verification). Returns [B,Sq,Hq,D].

    ``validate=False`` skips the input checks (they read the tables and lengths): for callers that checked
    the same metadata already, as :class:`~optimum_atb.PagedCache` does once per step, not once per layer.
    """
    if validate:
        scale = V.check_paged_attention(
            q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window, alibi_slopes, softcap
        )
    else:
        scale = V.resolve_scale(scale, q.shape[-1])
    return _run(
        "paged_attention", q.device, q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
        context_lens=context_lens, scale=scale, sliding_window=sliding_window,
        alibi_slopes=alibi_slopes, softcap=softcap,
    )  # fmt: skip


def reshape_and_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    validate: bool = True,
) -> None:
    """Write k/v [T,Hkv,D] into the pools at flat slots ``slot_mapping`` [T] (int, block*block_size+offset).

    Slots < 0 are skipped (padding). Out-of-range slots raise before anything is written (unless
    ``validate=False``: see :func:`paged_attention`).
    """
    if validate:
        V.check_reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)
    _run("reshape_and_cache", k.device, k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` (``F.linear``), through the backend's fastest form for the shape.

    On the CPU in float32 with at most 8 rows (decode steps), computed as ``weight @ x.T``: 2-4x faster
    there than ``F.linear`` (docs/results-cpu.md). Elsewhere ``F.linear`` itself.
    """
    V.check_linear(x, weight, bias)
    return _run("linear", x.device, x=x, weight=weight, bias=bias)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    residual: torch.Tensor | None = None,
    offset: float = 0.0,
):
    """RMSNorm over the last dim, computed in float32: ``(weight + offset) * x / rms(x)``.

    Matches ``LlamaRMSNorm`` (output cast back to x's dtype before the weight multiply; ``offset=1.0`` with
    Gemma's float32 ``x * (1 + w)``). With ``residual``: ``h = x + residual``, returns ``(norm(h), h)``.
    """
    V.check_norm(x, weight, residual)
    return _run("rms_norm", x.device, x=x, weight=weight, eps=eps, residual=residual, offset=offset)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    residual: torch.Tensor | None = None,
):
    """LayerNorm over the last dim; with ``residual`` returns ``(norm(x + residual), x + residual)``."""
    V.check_norm(x, weight, residual, bias)
    return _run("layer_norm", x.device, x=x, weight=weight, bias=bias, eps=eps, residual=residual)


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    interleaved: bool = False,
    rotary_dim: int | None = None,
    xpos_scale_base: float | None = None,
    positions: torch.Tensor | None = None,
):
    """Rotate q [B,S,Hq,D] and k [B,S,Hkv,D] by cos/sin [B or 1, S, rotary_dim] in one fused op.

    ``cos``/``sin`` are what the model's rotary module returns (every rope-scaling variant): per position
    the angles ``[t0..t(R/2-1), t0..t(R/2-1)]`` (rotate_half layout). Only the first ``rotary_dim`` channels
    turn (partial rotary), the rest pass through. ``interleaved`` (GPT-J) pairs channels (0,1),(2,3)..
    instead of (i, i+R/2), with cos/sin holding each angle twice in a row: ``[t0, t0, t1, t1, ..]``.
    ``xpos_scale_base`` applies xPos decay: pair ``i`` of q is scaled by ``zeta_i**(pos/base)`` and of k by
    its inverse, ``zeta_i = (2i + 0.4 R) / (1.4 R)``, ``positions`` [B or 1, S] required.
    Returns new tensors (q_rot, k_rot).
    """
    V.check_rotary(q, k, cos, sin, rotary_dim, xpos_scale_base, positions)
    return _run(
        "apply_rotary", q.device, q=q, k=k, cos=cos, sin=sin, interleaved=interleaved,
        rotary_dim=rotary_dim if rotary_dim is not None else cos.shape[-1],
        xpos_scale_base=xpos_scale_base, positions=positions,
    )  # fmt: skip


def alibi_slopes(num_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The ALiBi slopes of Press et al. for `num_heads` heads (float32 [num_heads])."""
    from .kernels.reference import alibi_slopes as _slopes

    return _slopes(num_heads, device=device)


def swiglu(gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up``; with ``up=None`` the input is ``cat(gate, up)`` on the last dim (npu_swiglu)."""
    V.check_glu(gate, up)
    return _run("swiglu", gate.device, gate=gate, up=up)


def geglu(gate: torch.Tensor, up: torch.Tensor | None = None, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(gate, approximate) * up``; with ``up=None`` the input is ``cat(gate, up)`` on the last dim."""
    V.check_glu(gate, up)
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
    return _run("geglu", gate.device, gate=gate, up=up, approximate=approximate)
