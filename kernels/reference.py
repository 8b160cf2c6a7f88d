"""Plain float64 math for every operator: the oracle the backends are tested against.

Written for clarity, not speed: explicit per-sequence / per-head loops and explicit masks, no SDPA. Every
function returns float64 tensors (differentiable, so gradients can be checked too) and follows the
conventions of :mod:`optimum_atb.ops`.

Rotary layouts (``cos``/``sin`` [B or 1, S, R], R = rotary_dim):

* halves (default, ``rotate_half``): channel ``i < R/2`` pairs with ``i + R/2``;
  ``out[i] = x[i] cos[i] - x[i+R/2] sin[i]``, ``out[i+R/2] = x[i+R/2] cos[i+R/2] + x[i] sin[i+R/2]``
  (``LlamaRotaryEmbedding`` repeats each angle in both halves: ``[t0..t(R/2-1), t0..t(R/2-1)]``).
* interleaved (GPT-J): channel ``2i`` pairs with ``2i+1``;
  ``out[2i] = x[2i] cos[2i] - x[2i+1] sin[2i]``, ``out[2i+1] = x[2i+1] cos[2i+1] + x[2i] sin[2i+1]``
  (cos/sin hold each angle twice in a row: ``[t0, t0, t1, t1, ...]``).
* xPos: the two channels of pair ``i`` (pairs numbered 0..R/2-1 in either layout) are further scaled by
  ``zeta_i ** (pos / base)`` for q and ``zeta_i ** (-pos / base)`` for k, ``zeta_i = (2i + 0.4 R) / (1.4 R)``.
* channels ``>= R`` pass through unchanged.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def alibi_slopes(num_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """ALiBi slopes (Press et al.) as float32 [num_heads], non-power-of-two counts as in BLOOM.

    For ``n`` a power of two: ``2 ** (-8 (h + 1) / n)``, h = 0..n-1. Otherwise the slopes of the largest
    power of two ``m < n``, then every other slope of ``2m`` (odd steps) for the remaining ``n - m`` heads.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    m = 2 ** math.floor(math.log2(num_heads))
    slopes = geometric(m)
    if m != num_heads:
        slopes += geometric(2 * m)[0::2][: num_heads - m]
    return torch.tensor(slopes, dtype=torch.float32, device=device)


def _attend_one(q, k, v, scale, *, causal, sliding_window, slopes, softcap, mask, kv_len):
    """One sequence: q [Sq,Hq,D], k/v [Sk,Hkv,D] -> (out [Sq,Hq,D], lse [Hq,Sq]) in float64.

    Keys at index >= kv_len are invisible; query row i sits at position kv_len - Sq + i.
    """
    sq, hq, _ = q.shape
    group = hq // k.shape[1]
    qpos = torch.tensor([kv_len - sq + i for i in range(sq)], dtype=F64).view(-1, 1)
    kpos = torch.arange(k.shape[0], dtype=F64).view(1, -1)
    visible = kpos < kv_len
    if causal:
        visible = visible & (kpos <= qpos)
    if sliding_window is not None:
        visible = visible & (kpos > qpos - sliding_window)
    outs, lses = [], []
    for h in range(hq):
        kh, vh = k[:, h // group].to(F64), v[:, h // group].to(F64)
        s = (q[:, h].to(F64) @ kh.T) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        if slopes is not None:
            s = s - float(slopes[h]) * (qpos - kpos).abs()
        allowed = visible if mask is None else visible & mask[h]
        has_key = allowed.any(dim=-1, keepdim=True)
        s = torch.where(allowed, s, torch.full_like(s, -math.inf))
        s = torch.where(has_key, s, torch.zeros_like(s))  # placeholder row, zeroed below
        lse = torch.logsumexp(s, dim=-1, keepdim=True)
        p = torch.exp(s - lse) * has_key
        outs.append(p @ vh)
        lses.append(torch.where(has_key, lse, torch.full_like(lse, -math.inf)).squeeze(-1))
    return torch.stack(outs, dim=1), torch.stack(lses, dim=0)


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
    return_lse: bool = False,
):
    """Reference of :func:`optimum_atb.ops.flash_attention` (dense or varlen), float64 out and lse."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    opts = dict(causal=causal, sliding_window=sliding_window, softcap=softcap)
    if cu_seqlens_q is not None:
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        outs, lses = [], []
        for b in range(len(cq) - 1):
            slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
            o, lse = _attend_one(
                q[cq[b] : cq[b + 1]], k[ck[b] : ck[b + 1]], v[ck[b] : ck[b + 1]], scale, slopes=slopes,
                mask=None, kv_len=ck[b + 1] - ck[b], **opts,
            )  # fmt: skip
            outs.append(o)
            lses.append(lse)
        out, lse = torch.cat(outs, dim=0), torch.cat(lses, dim=1)
        return (out, lse) if return_lse else out
    batch, sq, hq, _ = q.shape
    sk = k.shape[1]
    mask = None if attn_mask is None else attn_mask.to(torch.bool).expand(batch, hq, sq, sk)
    outs, lses = [], []
    for b in range(batch):
        slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        o, lse = _attend_one(
            q[b], k[b], v[b], scale, slopes=slopes, mask=None if mask is None else mask[b], kv_len=sk, **opts
        )
        outs.append(o)
        lses.append(lse)
    out, lse = torch.stack(outs), torch.stack(lses)
    return (out, lse) if return_lse else out


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
) -> torch.Tensor:
    """Reference of :func:`optimum_atb.ops.paged_attention`: key ``t`` of sequence b lives at
    ``cache[block_tables[b, t // block_size], t % block_size]``; new tokens are bottom-right causal."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    block_size = k_cache.shape[1]
    outs = []
    for b in range(q.shape[0]):
        n = int(context_lens[b])
        where = [(int(block_tables[b, t // block_size]), t % block_size) for t in range(n)]
        keys = torch.stack([k_cache[blk, off] for blk, off in where])
        values = torch.stack([v_cache[blk, off] for blk, off in where])
        slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        o, _ = _attend_one(
            q[b], keys, values, scale, causal=True, sliding_window=sliding_window, slopes=slopes,
            softcap=softcap, mask=None, kv_len=n,
        )  # fmt: skip
        outs.append(o)
    return torch.stack(outs)


def reshape_and_cache(k, v, k_cache, v_cache, slot_mapping) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`optimum_atb.ops.reshape_and_cache`: returns written copies of the pools."""
    k_new, v_new = k_cache.clone(), v_cache.clone()
    block_size = k_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            k_new[slot // block_size, slot % block_size] = k[t]
            v_new[slot // block_size, slot % block_size] = v[t]
    return k_new, v_new


def linear(x, weight, bias=None):
    """``x @ weight.T + bias`` in float64."""
    out = x.to(torch.float64) @ weight.to(torch.float64).T
    return out if bias is None else out + bias.to(torch.float64)


def rms_norm(x, weight, eps: float = 1e-6, *, residual=None, offset: float = 0.0):
    """``(weight + offset) * h / sqrt(mean(h^2) + eps)`` in float64 (``h = x + residual``: also returned)."""
    h = x.to(F64) if residual is None else x.to(F64) + residual.to(F64)
    out = h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps) * (weight.to(F64) + offset)
    return out if residual is None else (out, h)


def layer_norm(x, weight, bias=None, eps: float = 1e-5, *, residual=None):
    """``(h - mean) / sqrt(var + eps) * weight + bias`` in float64 (biased variance, as nn.LayerNorm)."""
    h = x.to(F64) if residual is None else x.to(F64) + residual.to(F64)
    mean = h.mean(-1, keepdim=True)
    out = (h - mean) / torch.sqrt(((h - mean) ** 2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.to(F64)
    if bias is not None:
        out = out + bias.to(F64)
    return out if residual is None else (out, h)


def _rotate_one(x, cos, sin, rotary_dim, interleaved, pair_scale):
    """x [B,S,H,D]; cos/sin [B|1,S,R]; pair_scale [B|1,S,R/2] or None. See the module docstring."""
    x = x.to(F64)
    c, s = cos.to(F64).unsqueeze(2), sin.to(F64).unsqueeze(2)
    out = x.clone()
    half = rotary_dim // 2
    for i in range(half):
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
        f = 1.0 if pair_scale is None else pair_scale[..., i].unsqueeze(-1)
        out[..., a] = (x[..., a] * c[..., a] - x[..., b] * s[..., a]) * f
        out[..., b] = (x[..., b] * c[..., b] + x[..., a] * s[..., b]) * f
    return out


def apply_rotary(
    q, k, cos, sin, *, interleaved: bool = False, rotary_dim: int | None = None,
    xpos_scale_base: float | None = None, positions=None,
):  # fmt: skip
    """Reference of :func:`optimum_atb.ops.apply_rotary` (float64 q_rot, k_rot)."""
    r = cos.shape[-1] if rotary_dim is None else rotary_dim
    up = down = None
    if xpos_scale_base is not None:
        zeta = torch.tensor([(2 * i + 0.4 * r) / (1.4 * r) for i in range(r // 2)], dtype=F64)
        power = positions.to(F64).unsqueeze(-1) / xpos_scale_base
        up, down = zeta**power, zeta ** (-power)
    return _rotate_one(q, cos, sin, r, interleaved, up), _rotate_one(k, cos, sin, r, interleaved, down)


def _halves(gate, up):
    if up is None:
        n = gate.shape[-1] // 2
        return gate[..., :n].to(F64), gate[..., n:].to(F64)
    return gate.to(F64), up.to(F64)


def swiglu(gate, up=None):
    """``gate * sigmoid(gate) * up`` in float64 (``up=None``: first half is the gate)."""
    g, u = _halves(gate, up)
    return g * torch.sigmoid(g) * u


def geglu(gate, up=None, approximate: str = "tanh"):
    """``gelu(gate) * up`` in float64, exact erf or tanh form (``up=None``: first half is the gate)."""
    g, u = _halves(gate, up)
    if approximate == "tanh":
        act = 0.5 * g * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g**3)))
    else:
        act = 0.5 * g * (1.0 + torch.erf(g / math.sqrt(2.0)))
    return act * u


__all__ = [
    "alibi_slopes",
    "apply_rotary",
    "flash_attention",
    "geglu",
    "layer_norm",
    "paged_attention",
    "reshape_and_cache",
    "rms_norm",
    "swiglu",
]
