"""The torch backend: every operator in native PyTorch (the CPU path and the fallback of the others).

Attention runs through ``F.scaled_dot_product_attention`` with ``enable_gqa=True`` (K/V never repeated)
whenever it can express the request; softcap, ``return_lse`` and ALiBi in half precision take an explicit
float32 math path (SDPA cannot softcap nor return the log-sum-exp, and a half-precision bias loses digits);
a half-precision single-token query takes two matmuls around a float32 softmax (SDPA is slow there on CPU).
Masking follows the conventions of :mod:`optimum_atb.ops`. Inputs arrive validated.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .dispatch import register

# ----------------------------------------------------------------------------------------------- attention


def _visibility(
    batch: int,
    sq: int,
    sk: int,
    device: torch.device,
    *,
    causal: bool,
    sliding_window: int | None,
    attn_mask: torch.Tensor | None,
    kv_len: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(allowed [B|1, Hq|1, Sq, Sk] bool or None when every key is visible, query positions [B|1, Sq]).

    Query row ``i`` sits at ``kv_len[b] - Sq + i`` (``Sk - Sq + i`` without ``kv_len``); keys at or past
    ``kv_len[b]`` are invisible.
    """
    rows = torch.arange(sq, device=device)
    if kv_len is None:
        q_pos = (rows + (sk - sq)).unsqueeze(0)
    else:
        q_pos = kv_len.to(torch.long).unsqueeze(1) - sq + rows
    k_pos = torch.arange(sk, device=device)
    allowed = None

    def _and(cond: torch.Tensor) -> None:
        nonlocal allowed
        allowed = cond if allowed is None else allowed & cond

    if kv_len is not None:
        _and((k_pos < kv_len.to(torch.long).view(-1, 1, 1)).unsqueeze(1))
    if causal:
        _and((k_pos <= q_pos.unsqueeze(-1)).unsqueeze(1))
    if sliding_window is not None:
        _and((k_pos > q_pos.unsqueeze(-1) - sliding_window).unsqueeze(1))
    if attn_mask is not None:
        m = attn_mask
        while m.dim() < 4:
            m = m.unsqueeze(0)
        _and(m.to(torch.bool))
    return allowed, q_pos


def _alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, sk: int) -> torch.Tensor:
    """float32 bias [B|1, Hq, Sq, Sk]: ``-slope * |q_pos - k_pos|``."""
    s = slopes.to(torch.float32)
    s = s.view(1, -1, 1, 1) if s.dim() == 1 else s.view(s.shape[0], s.shape[1], 1, 1)
    k_pos = torch.arange(sk, device=q_pos.device)
    dist = (q_pos.unsqueeze(-1) - k_pos).abs().to(torch.float32).unsqueeze(1)
    return -s * dist


def _math_attention(q, k, v, scale, allowed, bias, softcap, dropout_p):
    """float32 attention on (B,H,S,D) tensors with grouped heads; returns (out float32, lse [B,Hq,Sq])."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    qf = q.to(torch.float32).reshape(b, hkv, g, sq, d)
    kf, vf = k.to(torch.float32).unsqueeze(2), v.to(torch.float32).unsqueeze(2)
    s = (qf @ kf.transpose(-1, -2)).reshape(b, hq, sq, sk) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    out = (p.reshape(b, hkv, g, sq, sk) @ vf).reshape(b, hq, sq, vf.shape[-1])
    return out, lse


_HALF = (torch.bfloat16, torch.float16)
_MATMUL_DECODE_MIN_KEYS = 160  # batch * keys from which the matmul form beats SDPA (bf16, reference CPU)


def _sdpa(q, k, v, *, attn_mask, dropout_p, is_causal, scale):
    """``F.scaled_dot_product_attention`` with GQA, except a half-precision single-token query on the CPU.

    There SDPA's flash kernel costs 3-14x the plain ``softmax(q k^T) v`` (e.g. 918 against 103 us at batch 8,
    300 keys; docs/results-cpu.md), so that case runs as two matmuls in the input dtype around a float32
    softmax -- transformers' eager attention arithmetic. Below ~160 batch x keys the matmuls' fixed cost loses.
    """
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if not (
        sq == 1 and q.dtype in _HALF and q.device.type == "cpu" and dropout_p == 0.0
        and b * sk >= _MATMUL_DECODE_MIN_KEYS and (attn_mask is None or attn_mask.dtype == torch.bool)
    ):  # fmt: skip
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=True,
        )  # fmt: skip
    scores = torch.matmul(q.reshape(b, hkv, hq // hkv, d), k.transpose(-1, -2)).view(b, hq, 1, sk).float()
    scores = scores.mul_(scale)
    if attn_mask is not None:
        scores = scores.masked_fill_(~attn_mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(probs.view(b, hkv, hq // hkv, sk), v).view(b, hq, 1, v.shape[-1])


def _attention_bhsd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    sliding_window: int | None,
    alibi_slopes: torch.Tensor | None,
    softcap: float | None,
    attn_mask: torch.Tensor | None,
    kv_len: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
):
    """Attention on q [B,Hq,Sq,D], k/v [B,Hkv,Sk,D]; returns out [B,Hq,Sq,D] (and lse [B,Hq,Sq] float32)."""
    b, _, sq, _ = q.shape
    sk = k.shape[2]
    plain = sliding_window is None and alibi_slopes is None and attn_mask is None and kv_len is None
    use_math = return_lse or softcap is not None or (alibi_slopes is not None and q.dtype != torch.float32)
    if plain and not use_math and (not causal or sq == 1 or sq == sk):
        return _sdpa(q, k, v, attn_mask=None, dropout_p=dropout_p, is_causal=causal and sq > 1, scale=scale)

    allowed, q_pos = _visibility(
        b, sq, sk, q.device, causal=causal, sliding_window=sliding_window, attn_mask=attn_mask, kv_len=kv_len
    )
    bias = _alibi_bias(alibi_slopes, q_pos, sk) if alibi_slopes is not None else None
    row_ok = None
    # A row that sees no key would give NaN (and NaN gradients): let it see everything, zero it afterwards.
    if allowed is not None and (attn_mask is not None or kv_len is not None or (causal and sq > sk)):
        row_ok = allowed.any(dim=-1, keepdim=True)
        allowed = allowed | ~row_ok

    if use_math:
        out, lse = _math_attention(q, k, v, scale, allowed, bias, softcap, dropout_p)
        out = out.to(q.dtype)
    else:
        if bias is not None:
            mask = bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))
        else:
            mask = allowed
        out = _sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=False, scale=scale)
        lse = None
    if row_ok is not None:
        out = torch.where(row_ok, out, 0.0)
        if lse is not None:
            lse = torch.where(row_ok.squeeze(-1), lse, float("-inf"))
    if return_lse:
        return out, lse
    return out


@register("flash_attention", "torch")
def flash_attention(
    *,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    sliding_window: int | None,
    alibi_slopes: torch.Tensor | None,
    softcap: float | None,
    attn_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int | None,
    max_seqlen_k: int | None,
    dropout_p: float,
    return_lse: bool,
):
    """See :func:`optimum_atb.ops.flash_attention`. Varlen mode loops over the sequences (host sync)."""
    opts = dict(
        causal=causal, scale=scale, sliding_window=sliding_window, softcap=softcap, dropout_p=dropout_p,
        return_lse=return_lse,
    )  # fmt: skip
    if cu_seqlens_q is None:
        res = _attention_bhsd(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), alibi_slopes=alibi_slopes,
            attn_mask=attn_mask, **opts,
        )  # fmt: skip
        if return_lse:
            return res[0].transpose(1, 2), res[1]
        return res.transpose(1, 2)

    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        slopes = alibi_slopes[i] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        res = _attention_bhsd(
            q[cq[i] : cq[i + 1]].transpose(0, 1).unsqueeze(0),
            k[ck[i] : ck[i + 1]].transpose(0, 1).unsqueeze(0),
            v[ck[i] : ck[i + 1]].transpose(0, 1).unsqueeze(0),
            alibi_slopes=slopes, attn_mask=None, **opts,
        )  # fmt: skip
        out, lse = res if return_lse else (res, None)
        outs.append(out[0].transpose(0, 1))
        if return_lse:
            lses.append(lse[0])
    out = torch.cat(outs, dim=0)
    return (out, torch.cat(lses, dim=1)) if return_lse else out


def _consecutive_starts(
    block_tables: torch.Tensor, lens: list[int], first: int, bs: int, nb: int
) -> list[int] | None:
    """Per row, the block at column ``first`` when the row's blocks in use are consecutive ids (else None)."""
    starts = []
    for row, n in zip(block_tables.tolist(), lens):
        used = row[first : -(-n // bs)]
        if used != list(range(used[0], used[0] + len(used))) or not 0 <= used[0] <= used[-1] < nb:
            return None
        starts.append(used[0])
    return starts


@register("paged_attention", "torch")
def paged_attention(
    *,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    alibi_slopes: torch.Tensor | None,
    softcap: float | None,
) -> torch.Tensor:
    """Attends over each sequence's visible keys with SDPA, reading the pool as views where it can.

    Reads the block tables and context lengths on the host (this backend runs on the CPU; elsewhere it is a
    fallback). A row whose blocks in use are consecutive ids is a view of the pool: when every row is, with
    equal contexts (no padding) and evenly spaced starts -- the layout the allocator gives a batch that grows
    together -- the batch is one strided view and one SDPA call; otherwise one call per row. Scattered blocks
    are gathered (only the blocks in use); then, with unequal contexts, slots past a context are zeroed (they
    may hold anything, NaN included) and masked. A single-token query reads only the last
    ``sliding_window`` keys, so it needs no mask.
    """
    nb, bs, hkv, d = k_cache.shape
    dv = v_cache.shape[-1]
    b, sq = q.shape[:2]
    lens = context_lens.tolist()
    width = max(lens)
    uniform = min(lens) == width

    def visible_from(n: int) -> int:  # the first key position a query of a row of n keys can see
        return 0 if sliding_window is None else max(0, n - sq - sliding_window + 1)

    lo = visible_from(width) if uniform else 0
    first = lo // bs
    opts = dict(
        causal=True, scale=scale, sliding_window=None if sq == 1 else sliding_window,
        alibi_slopes=alibi_slopes, softcap=softcap, attn_mask=None,
    )  # fmt: skip
    qt = q.transpose(1, 2)
    views = k_cache.is_contiguous() and v_cache.is_contiguous()
    starts = _consecutive_starts(block_tables, lens, first, bs, nb) if views else None
    if starts is not None:
        k_flat, v_flat = k_cache.view(nb * bs, hkv, d), v_cache.view(nb * bs, hkv, dv)
        base = [s * bs - first * bs for s in starts]  # flat slot of position p of row i: base[i] + p
        step = base[1] - base[0] if b > 1 else 0
        if uniform and step >= 0 and all(x == base[0] + i * step for i, x in enumerate(base)):

            def strided(flat: torch.Tensor) -> torch.Tensor:
                row = flat[base[0] + lo :]
                size, strides = (b, width - lo, *flat.shape[1:]), (step * row.stride(0), *row.stride())
                return row.as_strided(size, strides, row.storage_offset()).transpose(1, 2)

            return _attention_bhsd(qt, strided(k_flat), strided(v_flat), **opts).transpose(1, 2)
        outs = []
        for i, n in enumerate(lens):
            rows = slice(base[i] + visible_from(n), base[i] + n)
            k_i, v_i = k_flat[rows].transpose(0, 1)[None], v_flat[rows].transpose(0, 1)[None]
            outs.append(_attention_bhsd(qt[i : i + 1], k_i, v_i, **opts))
        return torch.cat(outs).transpose(1, 2)

    # spare table entries may hold anything: clamped
    table = block_tables[:, first : -(-width // bs)].to(torch.long).clamp(0, nb - 1)
    keys = k_cache[table].reshape(b, -1, hkv, d)[:, lo - first * bs : width - first * bs].transpose(1, 2)
    values = v_cache[table].reshape(b, -1, hkv, dv)[:, lo - first * bs : width - first * bs].transpose(1, 2)
    if uniform:
        return _attention_bhsd(qt, keys, values, **opts).transpose(1, 2)
    # slots past a context may hold anything (NaN from torch.empty): 0 * NaN would leak through softmax @ V
    stale = torch.arange(width, device=q.device) >= context_lens.view(-1, 1).to(torch.long)
    stale = stale.view(b, 1, -1, 1)
    keys, values = keys.masked_fill(stale, 0), values.masked_fill(stale, 0)
    opts.update(sliding_window=sliding_window, kv_len=context_lens)
    return _attention_bhsd(qt, keys, values, **opts).transpose(1, 2)


@register("reshape_and_cache", "torch")
def reshape_and_cache(
    *,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """``index_copy_`` of the tokens with a slot >= 0 into the flattened pools (in place)."""
    keep = (slot_mapping >= 0).nonzero().squeeze(1)
    slots = slot_mapping
    if keep.numel() != slot_mapping.numel():  # some tokens are pads
        k, v, slots = k[keep], v[keep], slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots.to(torch.long), k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots.to(torch.long), v.to(v_cache.dtype))


# ---------------------------------------------------------------------------------------------- matmul

SMALL_GEMM_ROWS = 8  # float32 CPU products with at most this many rows may take the weight @ x^T form
_CHUNK_ROWS = 4
_FORM_MARGIN = 0.9  # the weight @ x^T form is chosen only when it takes < 90% of F.linear's time
_CALIBRATION_BYTES = 16 << 20  # weights smaller than this are timed over copies, so they come from memory
_weight_first_faster: dict[tuple[int, int, int], bool] = {}


_rows_vary = False  # see rows_vary_between_calls


@contextlib.contextmanager
def rows_vary_between_calls() -> Iterator[None]:
    """Within this context :func:`linear` always takes ``F.linear``: for a ``torch.compile`` graph whose
    row count is dynamic (speculative verify forwards of any width). Choosing the form by row count
    there would specialize the graph to one count: a compile for every width (20-60 s each for SmolLM2
    on a 2-core CPU). torch.compile guards on this flag, so graphs traced inside and outside differ."""
    global _rows_vary
    previous, _rows_vary = _rows_vary, True
    try:
        yield
    finally:
        _rows_vary = previous


def _weight_first(weight: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """``flat @ weight.T`` computed as ``weight @ flat.T`` ([rows, K] -> [N, rows])."""
    rows, k = flat.shape
    if rows == 1:
        return (weight @ flat.expand(2, k).contiguous().T)[:, :1]
    chunks = -(-rows // _CHUNK_ROWS)
    parts = [weight @ part.T for part in flat.split(-(-rows // chunks))]
    return parts[0] if chunks == 1 else torch.cat(parts, dim=1)


def _stock_form(weight: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    return F.linear(flat, weight)


def _seconds(form, weights: list[torch.Tensor], flat: torch.Tensor, repeats: int = 3) -> float:
    """Best of `repeats` passes of ``form(w, flat)`` over `weights` (after one warm-up call)."""
    form(weights[0], flat)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for w in weights:
            form(w, flat)
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def calibrate_linear_forms(weight: torch.Tensor) -> None:
    """Time ``F.linear`` against the weight @ x^T form for 1..SMALL_GEMM_ROWS rows of this weight shape
    and remember which is faster (once per shape and process, about 0.1-0.2 s for SmolLM2).

    Which form streams a float32 weight faster for a few rows depends on the CPU's BLAS: on an AMD EPYC
    the weight @ x^T form is 1.1-3.6x faster, on an Intel Xeon with AVX-512 0.34-0.59x (docs/results-cpu.md).
    """
    copies = max(1, min(4, _CALIBRATION_BYTES // max(1, weight.numel() * weight.element_size())))
    weights = [weight] + [weight.clone() for _ in range(copies - 1)]
    for rows in range(1, SMALL_GEMM_ROWS + 1):
        flat = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
        stock = _seconds(_stock_form, weights, flat)
        _weight_first_faster[_key(weight, rows)] = (
            _seconds(_weight_first, weights, flat) < _FORM_MARGIN * stock
        )


def _key(weight: torch.Tensor, rows: int) -> tuple[int, int, int]:
    """Calibration key: the weight's shape and the row count (not the thread count: reading it inside a
    torch.compile trace breaks the graph)."""
    return weight.shape[0], weight.shape[1], rows


@register("linear", "torch")
def linear(*, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear``, or for float32 on the CPU with 1 to 8 rows (decode, speculative verification)
    ``weight @ x^T`` where that was measured faster on this machine (:func:`calibrate_linear_forms`).

    On the AMD EPYC this project was first measured on, the BLAS call ``F.linear`` makes
    (``x @ weight^T``) streams the weight at 9-16 GB/s for so few rows, ``weight @ x^T`` with 2 to 4 columns
    at 35-43 GB/s; on an Intel Xeon F.linear is the faster one. Rows go in near-equal chunks of at most 4;
    a single row is doubled (a one-column product is a GEMV).
    """
    if _rows_vary:  # choosing a form per row count would compile a graph per count
        return F.linear(x, weight, bias)
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    small_fp32 = x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
    # calibrated at the first eager call (e.g. a prefill) for every row count; a weight first seen inside
    # a trace is not timed there and takes F.linear
    if small_fp32 and _key(weight, 1) not in _weight_first_faster and not torch.compiler.is_compiling():
        calibrate_linear_forms(weight.detach())
    if not (
        small_fp32 and 0 < rows <= SMALL_GEMM_ROWS and _weight_first_faster.get(_key(weight, rows), False)
    ):
        return F.linear(x, weight, bias)
    out = _weight_first(weight, x.reshape(rows, k)).T.contiguous()
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], weight.shape[0])


# ------------------------------------------------------------------------------------------------- norms


@register("rms_norm", "torch")
def rms_norm(
    *, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None, offset: float
):
    """LlamaRMSNorm (``offset=0``) / GemmaRMSNorm-style (``offset!=0``: float32 ``x * (offset + w)``)."""
    h = x if residual is None else x + residual
    hf = h.to(torch.float32)
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0:
        out = weight * hf.to(h.dtype)
    else:
        out = (hf * (offset + weight.float())).to(h.dtype)
    return out if residual is None else (out, h)


@register("layer_norm", "torch")
def layer_norm(
    *,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
):
    """``F.layer_norm`` over the last dim (as ``nn.LayerNorm``), optionally after a residual add."""
    h = x if residual is None else x + residual
    out = F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
    return out if residual is None else (out, h)


# ------------------------------------------------------------------------------------------------ rotary


def _rotate(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """rotate_half (halves) or its GPT-J form: pairs (x0, x1) -> (-x1, x0)."""
    if interleaved:
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def xpos_zeta(rotary_dim: int, interleaved: bool, device: torch.device | None = None) -> torch.Tensor:
    """xPos per-channel base ``zeta_i = (2i + 0.4 R) / (1.4 R)`` for pair i, laid out like cos/sin."""
    z = (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) + 0.4 * rotary_dim) / (
        1.4 * rotary_dim
    )
    return z.repeat_interleave(2) if interleaved else torch.cat((z, z))


@register("apply_rotary", "torch")
def apply_rotary(
    *,
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
    rotary_dim: int,
    xpos_scale_base: float | None,
    positions: torch.Tensor | None,
):
    """``x * cos + rotate(x) * sin`` on the first ``rotary_dim`` channels, computed in float32 and rounded
    once (in fp32 this is exactly transformers' ``apply_rotary_pos_emb``).

    With xPos the rotated channels of q are further multiplied by ``zeta ** (pos / base)`` and those of
    k by ``zeta ** (-pos / base)`` (see :func:`xpos_zeta`).
    """
    c = cos.to(torch.float32).unsqueeze(2)  # [B|1, S, 1, R]
    s = sin.to(torch.float32).unsqueeze(2)
    qc = kc = c
    qs = ks = s
    if xpos_scale_base is not None:
        power = positions.to(torch.float32).unsqueeze(-1) / xpos_scale_base  # [B|1, S, 1]
        scale = (xpos_zeta(rotary_dim, interleaved, q.device) ** power).unsqueeze(2)  # [B|1, S, 1, R]
        qc, qs, kc, ks = c * scale, s * scale, c / scale, s / scale

    def turn(x, cc, ss):
        xr = x[..., :rotary_dim].to(torch.float32)
        rot = (xr * cc + _rotate(xr, interleaved) * ss).to(x.dtype)
        return rot if rotary_dim == x.shape[-1] else torch.cat((rot, x[..., rotary_dim:]), dim=-1)

    return turn(q, qc, qs), turn(k, kc, ks)


# ------------------------------------------------------------------------------------------- activations


def _split(gate: torch.Tensor, up: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return gate.chunk(2, dim=-1) if up is None else (gate, up)


@register("swiglu", "torch")
def swiglu(*, gate: torch.Tensor, up: torch.Tensor | None) -> torch.Tensor:
    """``silu(gate) * up`` (``up=None``: first half of the last dim is the gate)."""
    g, u = _split(gate, up)
    return F.silu(g) * u


@register("geglu", "torch")
def geglu(*, gate: torch.Tensor, up: torch.Tensor | None, approximate: str) -> torch.Tensor:
    """``gelu(gate, approximate) * up`` (``up=None``: first half of the last dim is the gate)."""
    g, u = _split(gate, up)
    return F.gelu(g, approximate=approximate) * u
