"""A pure-torch emulator of the torch_npu operators the npu backend calls (semantics: docs/npu.md).

No Ascend device is available to this project, so the npu backend is tested against this emulator of the
*documented* behaviour. It is strict on purpose: arguments the documentation requires (an explicit
``scale``, host-side ``context_lens``, the 2048x2048 compressed causal mask for sparse modes 3/4, block
size rules, mask shapes without broadcasting over the query dimension, ...) raise when missing, and a
fully masked row without ``inner_precise`` 2/3 yields NaN (the precision loss the documentation warns of),
so misuse fails the tests. It computes with its own float32 math (never optimum_atb's kernels).

Use :func:`installed` to put it into ``sys.modules["torch_npu"]``; every call is appended to the module's
``calls`` list as ``(name, {argument: value})`` so tests can check what the backend passed.
"""

from __future__ import annotations

import contextlib
import math
import sys
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F

MAX_TOKENS = 2147483647
_UNSET = object()
_MASK_DTYPES = (torch.bool, torch.int8, torch.uint8)
_calls: list[tuple[str, dict]] = []


def _record(name: str, args: dict) -> None:
    _calls.append((name, dict(args)))


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise RuntimeError(f"torch_npu emulator: {message}")


# ----------------------------------------------------------------------------------------- attention core


def _check_compressed_mask(mask: torch.Tensor | None, sparse_mode: int) -> None:
    _check(
        mask is not None, f"sparse_mode={sparse_mode} needs the compressed atten_mask triu(ones(2048,2048),1)"
    )
    _check(mask.dtype in _MASK_DTYPES, f"atten_mask dtype must be bool/int8/uint8, got {mask.dtype}")
    _check(
        tuple(mask.shape) == (2048, 2048),
        f"sparse_mode={sparse_mode} needs a 2048x2048 mask, got {tuple(mask.shape)}",
    )
    expected = torch.triu(torch.ones(2048, 2048, dtype=torch.bool, device=mask.device), diagonal=1)
    _check(
        bool((mask.to(torch.bool) == expected).all()),
        "compressed mask must be triu(ones(2048,2048),1) (1=masked)",
    )


def _explicit_mask(mask: torch.Tensor, batch: int, sq: int, sk: int) -> torch.Tensor:
    """sparse_mode 0 mask (1 = masked) as bool [B|1, 1, Sq, Sk]; no broadcasting over Sq or Sk."""
    _check(mask.dtype in _MASK_DTYPES, f"atten_mask dtype must be bool/int8/uint8, got {mask.dtype}")
    shape = tuple(mask.shape)
    _check(shape[-2:] == (sq, sk), f"atten_mask must end in (Q_S, KV_S)=({sq}, {sk}), got {shape}")
    lead = shape[:-2]
    ok = lead in ((), (1,), (batch,), (1, 1), (batch, 1))
    _check(ok, f"atten_mask shape {shape} is not one of SS, 1SS, BSS, 11SS, B1SS")
    m = mask.to(torch.bool)
    while m.dim() < 4:
        m = m.unsqueeze(0) if m.dim() < 3 else m.unsqueeze(1)
    return m


def _visible(
    sq: int,
    sk: int,
    q_len: int,
    kv_len: int,
    sparse_mode: int,
    pre_tokens: int,
    next_tokens: int,
    device: torch.device,
) -> torch.Tensor:
    """bool [Sq, Sk] for one sequence: key padding plus the sparse mode's band (positions bottom-right)."""
    rows = torch.arange(sq, device=device).unsqueeze(1)
    cols = torch.arange(sk, device=device).unsqueeze(0)
    pos = rows + (kv_len - q_len)
    vis = (cols < kv_len) & (rows < q_len)
    if sparse_mode == 3:
        vis = vis & (cols <= pos)
    elif sparse_mode == 4:
        vis = vis & (cols <= pos + next_tokens) & (cols > pos - pre_tokens)
    return vis


def _attend(q, k, v, scale, visible, bias, bias_scaled, fix_invalid, keep_prob=1.0):
    """q [B,N,Sq,D], k/v [B,Nkv,Sk,D], visible bool [B,1|N,Sq,Sk] -> (out [B,N,Sq,Dv] f32, lse, max, sum)."""
    n, nkv = q.shape[1], k.shape[1]
    kf = k.float().repeat_interleave(n // nkv, dim=1)
    vf = v.float().repeat_interleave(n // nkv, dim=1)
    s = q.float() @ kf.transpose(-1, -2)
    if bias is not None and not bias_scaled:  # npu_fusion_attention: scale * (QK^T + pse)
        s = s + bias.float()
    s = s * scale
    if bias is not None and bias_scaled:  # FIA: scale * QK^T + pse_shift
        s = s + bias.float()
    row_ok = visible.any(dim=-1, keepdim=True)
    if fix_invalid:  # invalid-row computation: rows that see nothing give 0
        visible = visible | ~row_ok
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))  # NaN on a fully masked row unless fixed
    if keep_prob < 1.0:
        p = F.dropout(p, 1.0 - keep_prob)
    out = p @ vf
    ok = row_ok.squeeze(-1)
    smax = torch.where(ok, s.amax(dim=-1), float("-inf"))
    ssum = torch.where(ok, torch.exp(lse - s.amax(dim=-1)), 0.0)
    if fix_invalid:
        out = torch.where(row_ok, out, 0.0)
        lse = torch.where(ok, lse, float("inf"))
    return out, lse, smax, ssum


def _to_bnsd(x: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    if layout == "BSND":
        return x.transpose(1, 2)
    if layout == "BNSD":
        return x
    if layout == "BSH":
        return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)
    raise RuntimeError(f"torch_npu emulator: unsupported input_layout {layout!r}")


def _from_bnsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "BSND":
        return x.transpose(1, 2)
    if layout == "BNSD":
        return x
    return x.transpose(1, 2).flatten(2)  # BSH


def _heads(layout: str, query, key, num_heads: int, num_kv_heads: int, paged: bool) -> tuple[int, int]:
    _check(
        isinstance(num_heads, int) and num_heads >= 1, f"num_heads must be a positive int, got {num_heads!r}"
    )
    kv = num_kv_heads or num_heads
    q_heads = {"BSND": 2, "BNSD": 1, "TND": 1}.get(layout)
    if q_heads is not None:
        _check(
            query.shape[q_heads] == num_heads, f"num_heads={num_heads} but query has {query.shape[q_heads]}"
        )
    if not paged and layout in ("BSND", "BNSD", "TND"):
        _check(key.shape[q_heads] == kv, f"num_key_value_heads={kv} but key has {key.shape[q_heads]} heads")
    _check(num_heads % kv == 0, f"num_heads/num_key_value_heads must be an integer ({num_heads}/{kv})")
    _check(num_heads // kv <= 64, f"num_heads/num_key_value_heads must be <= 64, got {num_heads // kv}")
    return num_heads, kv


def _gather_pages(cache, block_table, kv_lens, block_size, kv_heads, device):
    """Paged K or V [num_blocks, block_size, H*D] or [num_blocks, N, block_size, D] -> [B,N,S,D]."""
    if cache.dim() == 3:
        cache = cache.view(cache.shape[0], block_size, kv_heads, -1)
    elif cache.dim() == 4:
        _check(cache.shape[2] == block_size, "4-D paged cache must be [num_blocks, N, block_size, D]")
        cache = cache.transpose(1, 2)
    else:
        raise RuntimeError("torch_npu emulator: paged key/value must be 3-D (BnBsH) or 4-D (BnNBsD)")
    _check(cache.shape[1] == block_size, f"cache block size {cache.shape[1]} != block_size={block_size}")
    max_blocks = block_table.shape[1]
    table = block_table.to(torch.long).clone()
    for b, n in enumerate(kv_lens):
        used = -(-n // block_size)
        _check(used <= max_blocks, f"sequence {b}: {n} keys need {used} blocks, block_table has {max_blocks}")
        ids = table[b, :used]
        _check(bool(((ids >= 0) & (ids < cache.shape[0])).all()), f"sequence {b}: block id out of range")
        table[b, used:] = 0  # entries past the sequence are never read
    keys = cache[table].reshape(len(kv_lens), max_blocks * block_size, kv_heads, -1)
    # slots past a sequence's length are never read by the device operator: zero them here so that
    # whatever they hold (garbage, NaN) cannot leak into softmax @ V.
    unread = (
        torch.arange(keys.shape[1], device=keys.device)[None, :]
        >= torch.tensor(kv_lens, device=keys.device)[:, None]
    )
    keys = keys.masked_fill(unread[:, :, None, None], 0)
    return keys.transpose(1, 2)


def npu_fused_infer_attention_score(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    pse_shift: torch.Tensor | None = None,
    atten_mask: torch.Tensor | None = None,
    actual_seq_lengths: list[int] | None = None,
    actual_seq_lengths_kv: list[int] | None = None,
    block_table: torch.Tensor | None = None,
    num_heads: int = 1,
    scale=_UNSET,
    pre_tokens: int = MAX_TOKENS,
    next_tokens: int = MAX_TOKENS,
    input_layout: str = "BSH",
    num_key_value_heads: int = 0,
    sparse_mode: int = 0,
    inner_precise: int = 0,
    block_size: int = 0,
    softmax_lse_flag: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FIA: Q_S == 1 -> incremental branch, else prompt branch. Returns (attention_out, softmax_lse)."""
    args = dict(locals())
    _check(scale is not _UNSET, "scale defaults to 1.0 on the NPU: pass 1/sqrt(head_dim) explicitly")
    _check(isinstance(scale, float), f"scale must be a Python float, got {type(scale).__name__}")
    _check(sparse_mode in (0, 3, 4), f"sparse_mode {sparse_mode} is not emulated (0, 3, 4 are)")
    _check(inner_precise in (0, 1, 2, 3), f"inner_precise must be 0..3, got {inner_precise}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check(t.is_contiguous(), f"{name} must be contiguous")
    paged = block_table is not None
    n, nkv = _heads(input_layout, query, key, num_heads, num_key_value_heads, paged)
    if sparse_mode in (3, 4):
        _check_compressed_mask(atten_mask, sparse_mode)
    else:
        _check(
            pre_tokens == MAX_TOKENS and next_tokens == MAX_TOKENS,
            "pre/next_tokens with sparse_mode 0: not emulated",
        )

    if input_layout == "TND":
        _check(not paged, "paged TND: not emulated")
        _check(
            actual_seq_lengths is not None and actual_seq_lengths_kv is not None,
            "TND needs actual_seq_lengths(_kv)",
        )
        cq, ck = [0, *actual_seq_lengths], [0, *actual_seq_lengths_kv]
        _check(
            cq[-1] == query.shape[0] and ck[-1] == key.shape[0], "TND lengths must be cumulative, ending at T"
        )
        q_lens = [cq[i + 1] - cq[i] for i in range(len(cq) - 1)]
        args["branch"] = "incre" if max(q_lens) == 1 else "prompt"
        _check(atten_mask is None or sparse_mode != 0, "TND with an explicit mask: not emulated")
        outs, lses = [], []
        for b, q_len in enumerate(q_lens):
            kv_len = ck[b + 1] - ck[b]
            qb = query[cq[b] : cq[b + 1]].transpose(0, 1).unsqueeze(0)
            kb = key[ck[b] : ck[b + 1]].transpose(0, 1).unsqueeze(0)
            vb = value[ck[b] : ck[b + 1]].transpose(0, 1).unsqueeze(0)
            vis = _visible(q_len, kv_len, q_len, kv_len, sparse_mode, pre_tokens, next_tokens, query.device)
            out, lse, _, _ = _attend(
                qb, kb, vb, scale, vis.view(1, 1, q_len, kv_len), None, True, inner_precise >= 2
            )
            outs.append(out[0].transpose(0, 1))
            lses.append(lse[0].transpose(0, 1))
        _record("npu_fused_infer_attention_score", args)
        out = torch.cat(outs).to(query.dtype)
        lse = torch.cat(lses).unsqueeze(-1) if softmax_lse_flag else torch.empty(0, device=query.device)
        return out, lse

    q = _to_bnsd(query, input_layout, n)
    batch, _, sq, _ = q.shape
    args["branch"] = "incre" if sq == 1 else "prompt"
    if paged:
        _check(
            block_table.dtype == torch.int32 and block_table.dim() == 2,
            "block_table must be int32 [B, max_blocks]",
        )
        _check(block_table.shape[0] == batch, "block_table must have one row per batch entry")
        _check(
            actual_seq_lengths_kv is not None, "paged attention (block_table) requires actual_seq_lengths_kv"
        )
        _check(len(actual_seq_lengths_kv) == batch, "actual_seq_lengths_kv needs one length per batch entry")
        if sq > 1:
            ok = block_size % 128 == 0 and 128 <= block_size <= 512
            _check(
                ok,
                f"Q_S > 1 with block_table needs block_size a multiple of 128 in [128, 512], got {block_size}",
            )
        else:
            _check(
                block_size % 16 == 0 and 0 < block_size <= 512,
                f"Q_S == 1 needs block_size % 16 == 0 and <= 512, got {block_size}",
            )
        kv_lens = [int(x) for x in actual_seq_lengths_kv]
        k = _gather_pages(key, block_table, kv_lens, block_size, nkv, query.device)
        v = _gather_pages(value, block_table, kv_lens, block_size, nkv, query.device)
    else:
        k, v = _to_bnsd(key, input_layout, nkv), _to_bnsd(value, input_layout, nkv)
        kv_lens = (
            [k.shape[2]] * batch if actual_seq_lengths_kv is None else [int(x) for x in actual_seq_lengths_kv]
        )
    q_lens = [sq] * batch if actual_seq_lengths is None else [int(x) for x in actual_seq_lengths]
    sk = k.shape[2]
    vis = torch.stack(
        [
            _visible(sq, sk, q_lens[b], kv_lens[b], sparse_mode, pre_tokens, next_tokens, q.device)
            for b in range(batch)
        ]
    ).unsqueeze(1)
    if sparse_mode == 0 and atten_mask is not None:
        vis = vis & ~_explicit_mask(atten_mask, batch, sq, sk)
    if pse_shift is not None:
        ok = (
            pse_shift.dim() == 4
            and pse_shift.shape[0] in (1, batch)
            and tuple(pse_shift.shape[1:]) == (n, sq, sk)
        )
        _check(
            ok, f"pse_shift must be [B|1, N, Q_S, KV_S]=[., {n}, {sq}, {sk}], got {tuple(pse_shift.shape)}"
        )
    out, lse, _, _ = _attend(q, k, v, scale, vis, pse_shift, True, inner_precise >= 2)
    _record("npu_fused_infer_attention_score", args)
    out = _from_bnsd(out.to(query.dtype), input_layout).contiguous()
    return out, (lse.unsqueeze(-1) if softmax_lse_flag else torch.empty(0, device=query.device))


def npu_fusion_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    head_num: int,
    input_layout: str,
    pse: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    atten_mask: torch.Tensor | None = None,
    scale=_UNSET,
    keep_prob: float = 1.0,
    pre_tockens: int = MAX_TOKENS,
    next_tockens: int = MAX_TOKENS,
    inner_precise: int = 0,
    prefix: list[int] | None = None,
    actual_seq_qlen: list[int] | None = None,
    actual_seq_kvlen: list[int] | None = None,
    sparse_mode: int = 0,
    gen_mask_parallel: bool = True,
    sync: bool = False,
):
    """FlashAttentionScore (training, differentiable). Returns (out, softmax_max, softmax_sum, softmax_out,
    seed, offset, numels); softmax_max/sum are [B,N,Sq,8] ([T,N,8] for TND), the value repeated 8 times."""
    args = dict(locals())
    _check(scale is not _UNSET, "scale defaults to 1.0 on the NPU: pass it explicitly")
    _check(padding_mask is None and prefix is None, "padding_mask/prefix are not supported")
    _check(sparse_mode in (0, 3, 4), f"sparse_mode {sparse_mode} is not emulated (0, 3, 4 are)")
    _check(0.0 < keep_prob <= 1.0, f"keep_prob must be in (0, 1], got {keep_prob}")
    if sparse_mode in (3, 4):
        _check_compressed_mask(atten_mask, sparse_mode)
    else:
        _check(
            pre_tockens == MAX_TOKENS and next_tockens == MAX_TOKENS,
            "pre/next_tockens with sparse_mode 0: not emulated",
        )
    fix = inner_precise == 2
    if input_layout == "TND":
        _check(
            actual_seq_qlen is not None and actual_seq_kvlen is not None, "TND needs actual_seq_qlen/kvlen"
        )
        _check(query.shape[1] == head_num, f"head_num={head_num} but query has {query.shape[1]} heads")
        _check(atten_mask is None or sparse_mode != 0, "TND with an explicit mask: not emulated")
        cq, ck = [0, *actual_seq_qlen], [0, *actual_seq_kvlen]
        _check(
            cq[-1] == query.shape[0] and ck[-1] == key.shape[0], "TND lengths must be cumulative, ending at T"
        )
        outs, maxs, sums = [], [], []
        for b in range(len(cq) - 1):
            q_len, kv_len = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
            qb = query[cq[b] : cq[b + 1]].transpose(0, 1).unsqueeze(0)
            kb = key[ck[b] : ck[b + 1]].transpose(0, 1).unsqueeze(0)
            vb = value[ck[b] : ck[b + 1]].transpose(0, 1).unsqueeze(0)
            vis = _visible(q_len, kv_len, q_len, kv_len, sparse_mode, pre_tockens, next_tockens, query.device)
            out, _, smax, ssum = _attend(
                qb, kb, vb, scale, vis.view(1, 1, q_len, kv_len), None, False, fix, keep_prob
            )
            outs.append(out[0].transpose(0, 1))
            maxs.append(smax[0].transpose(0, 1))
            sums.append(ssum[0].transpose(0, 1))
        _record("npu_fusion_attention", args)
        smax, ssum = torch.cat(maxs), torch.cat(sums)
        out = torch.cat(outs).to(query.dtype)
    else:
        _check(input_layout in ("BSND", "BNSD"), f"input_layout {input_layout!r} is not emulated")
        q = _to_bnsd(query, input_layout, head_num)
        _check(q.shape[1] == head_num, f"head_num={head_num} but query has {q.shape[1]} heads")
        k, v = _to_bnsd(key, input_layout, 0), _to_bnsd(value, input_layout, 0)
        _check(head_num % k.shape[1] == 0, "key heads must divide head_num")
        batch, _, sq, _ = q.shape
        sk = k.shape[2]
        vis = _visible(sq, sk, sq, sk, sparse_mode, pre_tockens, next_tockens, q.device).view(1, 1, sq, sk)
        if sparse_mode == 0 and atten_mask is not None:
            vis = vis & ~_explicit_mask(atten_mask, batch, sq, sk)
        if pse is not None:
            ok = pse.dim() == 4 and pse.shape[0] in (1, batch) and tuple(pse.shape[1:]) == (head_num, sq, sk)
            _check(ok, f"pse must be BNSS or 1NSS, got {tuple(pse.shape)}")
        out, _, smax, ssum = _attend(q, k, v, scale, vis, pse, False, fix, keep_prob)
        _record("npu_fusion_attention", args)
        out = _from_bnsd(out.to(query.dtype), input_layout)
    smax = smax.unsqueeze(-1).expand(*smax.shape, 8)
    ssum = ssum.unsqueeze(-1).expand(*ssum.shape, 8)
    return out, smax, ssum, torch.empty(0), 0, 0, 0


def _npu_paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    num_kv_heads: int,
    num_heads: int,
    scale_value: float,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """ATB PagedAttention (decode): query [T,N,D] over key_cache [num_blocks, block_size, Nkv, D]; writes `out`."""
    _record("_npu_paged_attention", locals())
    _check(
        query.dim() == 3 and query.shape[1] == num_heads, "query must be [num_tokens, num_heads, head_dim]"
    )
    _check(
        key_cache.dim() == 4 and key_cache.shape[2] == num_kv_heads,
        "key_cache must be [blocks, block_size, Nkv, D]",
    )
    _check(num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads")
    _check(isinstance(scale_value, float), "scale_value must be a Python float")
    block_size = key_cache.shape[1]
    _check(block_size % 16 == 0, f"block_size must be a multiple of 16, got {block_size}")
    _check(block_table.dtype == torch.int32, f"block_table must be int32, got {block_table.dtype}")
    _check(block_table.device == query.device, "block_table must live on the device")
    _check(
        context_lens.device.type == "cpu",
        f"context_lens must be on the host (CPU), got {context_lens.device}",
    )
    _check(context_lens.dtype == torch.int32, f"context_lens must be int32, got {context_lens.dtype}")
    _check(
        block_table.shape[0] == query.shape[0] == context_lens.shape[0],
        "one block_table row / length per token",
    )
    _check(
        out.shape == query.shape[:2] + (value_cache.shape[-1],) and out.dtype == query.dtype,
        "bad `out` buffer",
    )
    lens = [int(x) for x in context_lens]
    k = _gather_pages(key_cache.flatten(2), block_table, lens, block_size, num_kv_heads, query.device)
    v = _gather_pages(value_cache.flatten(2), block_table, lens, block_size, num_kv_heads, query.device)
    vis = torch.stack([_visible(1, k.shape[2], 1, n, 0, 0, 0, query.device) for n in lens]).unsqueeze(1)
    res, _, _, _ = _attend(query.unsqueeze(2), k, v, scale_value, vis, None, True, False)
    out.copy_(res.squeeze(2).to(out.dtype))


def _npu_reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_indices: torch.Tensor,
) -> None:
    """Write key/value [T, Nkv, D] at flat slots ``slot_indices`` [T] int32 of the paged caches (in place)."""
    _record("_npu_reshape_and_cache", locals())
    _check(slot_indices.dtype == torch.int32, f"slot_indices must be int32, got {slot_indices.dtype}")
    _check(
        key.dtype == key_cache.dtype and value.dtype == value_cache.dtype,
        "key/value dtype must match the caches",
    )
    _check(key.shape[0] == value.shape[0] == slot_indices.shape[0], "one slot per token")
    slots = slot_indices.to(torch.long)
    total = key_cache.shape[0] * key_cache.shape[1]
    _check(
        bool(((slots >= 0) & (slots < total)).all()),
        "slot out of range (negative padding slots are not skipped)",
    )
    key_cache.view(total, *key_cache.shape[2:])[slots] = key
    value_cache.view(total, *value_cache.shape[2:])[slots] = value


# --------------------------------------------------------------------------------- norm / rotary / activations


def _rms(x: torch.Tensor, gamma: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check(gamma.dtype == x.dtype, f"gamma dtype {gamma.dtype} must match the input's {x.dtype}")
    _check(tuple(x.shape[-gamma.dim() :]) == tuple(gamma.shape), "gamma must match the input's trailing dims")
    dims = tuple(range(x.dim() - gamma.dim(), x.dim()))
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(x.dtype), rstd


def npu_rms_norm(self: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6):
    """RmsNorm -> (y, rstd); y = x * rstd * gamma computed in float32."""
    _record("npu_rms_norm", dict(self=self, gamma=gamma, epsilon=epsilon))
    return _rms(self, gamma, epsilon)


def npu_add_rms_norm(x1: torch.Tensor, x2: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6):
    """AddRmsNorm -> (y, rstd, x) with x = x1 + x2 and y = RmsNorm(x)."""
    _record("npu_add_rms_norm", dict(x1=x1, x2=x2, gamma=gamma, epsilon=epsilon))
    _check(x1.shape == x2.shape and x1.dtype == x2.dtype, "x1 and x2 must have the same shape and dtype")
    x = x1 + x2
    y, rstd = _rms(x, gamma, epsilon)
    return y, rstd, x


def npu_rotary_mul(self: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, rotary_mode: str = "half"):
    """``x * r1 + rotate(x) * r2`` on 4-D x; rotate = rotate_half ("half") or pairwise ("interleave")."""
    _record("npu_rotary_mul", dict(self=self, r1=r1, r2=r2, rotary_mode=rotary_mode))
    _check(
        rotary_mode in ("half", "interleave"),
        f"rotary_mode must be 'half' or 'interleave', got {rotary_mode!r}",
    )
    _check(self.dim() == 4 and r1.dim() == 4, "npu_rotary_mul takes 4-D inputs")
    _check(r1.shape == r2.shape, "r1 and r2 must have the same shape")
    _check(r1.dtype == self.dtype == r2.dtype, "r1/r2 dtype must match the input's")
    _check(r1.shape[-1] == self.shape[-1], "r1/r2 last dim must equal head_dim")
    _check(torch.broadcast_shapes(self.shape, r1.shape) == self.shape, "r1/r2 must broadcast to the input")
    x = self.float()
    if rotary_mode == "half":
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    else:
        rot = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    return (x * r1.float() + rot * r2.float()).to(self.dtype)


def npu_swiglu(self: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """swish(A) * B where A is the first half of `self` along `dim`."""
    _record("npu_swiglu", dict(self=self, dim=dim))
    _check(self.shape[dim] % 2 == 0, "the split dim must be even")
    a, b = self.float().chunk(2, dim=dim)
    return (F.silu(a) * b).to(self.dtype)


def npu_geglu(self: torch.Tensor, dim: int = -1, approximate: int = 1, activate_left: bool = False):
    """GeGlu -> (out, gelu): activate_left=False gives A * gelu(B), True gives gelu(A) * B; approximate 1=tanh."""
    _record("npu_geglu", dict(self=self, dim=dim, approximate=approximate, activate_left=activate_left))
    _check(approximate in (0, 1), f"approximate must be 0 (none) or 1 (tanh), got {approximate}")
    _check(self.shape[dim] % 2 == 0, "the split dim must be even")
    a, b = self.float().chunk(2, dim=dim)
    act, other = (a, b) if activate_left else (b, a)
    gelu = F.gelu(act, approximate="tanh" if approximate == 1 else "none")
    return (gelu * other).to(self.dtype), gelu.to(self.dtype)


# ----------------------------------------------------------------------------------- weight-only quant matmul


def npu_convert_weight_to_int4pack(weight: torch.Tensor) -> torch.Tensor:
    """int32 [K, N] holding int4 values in [-8, 7] -> int32 [K, N/8], eight nibbles per int32, lowest first."""
    _record("npu_convert_weight_to_int4pack", dict(weight=weight))
    _check(weight.dtype == torch.int32 and weight.dim() == 2, "weight must be int32 [K, N]")
    _check(weight.shape[1] % 8 == 0, "N must be a multiple of 8")
    _check(bool(((weight >= -8) & (weight <= 7)).all()), "int4 values must lie in [-8, 7]")
    nib = (weight.to(torch.int64) & 0xF).view(weight.shape[0], -1, 8)
    packed = (nib << (4 * torch.arange(8, device=weight.device))).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    shifts = 4 * torch.arange(8, device=packed.device)
    nib = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF
    return torch.where(nib >= 8, nib - 16, nib).flatten(-2)


def npu_weight_quant_batchmatmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    antiquant_scale: torch.Tensor,
    antiquant_offset: torch.Tensor | None = None,
    quant_scale: torch.Tensor | None = None,
    quant_offset: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    antiquant_group_size: int = 0,
    inner_precise: int = 0,
) -> torch.Tensor:
    """W8A16/W4A16: ``x @ ((weight + antiquant_offset) * antiquant_scale) + bias``.

    x [M, K] fp16/bf16; weight [K, N] int8, or int32 [K, N/8] carrying int4 (see
    :func:`npu_convert_weight_to_int4pack`); scale/offset [N], [1, N] (per channel) or
    [ceil(K / group), N] with ``antiquant_group_size`` a multiple of 32 (per group), in x's dtype.
    """
    _record("npu_weight_quant_batchmatmul", locals())
    _check(quant_scale is None and quant_offset is None, "output quantization (quant_scale) is not emulated")
    _check(x.dim() == 2 and x.dtype in (torch.float16, torch.bfloat16), "x must be fp16/bf16 [M, K]")
    if weight.dtype == torch.int8:
        w = weight.to(torch.int64)
    else:
        _check(weight.dtype == torch.int32, f"weight must be int8 or int32 (packed int4), got {weight.dtype}")
        w = _unpack_int4(weight)
    _check(
        w.dim() == 2 and w.shape[0] == x.shape[1], f"weight must be [K={x.shape[1]}, N], got {tuple(w.shape)}"
    )
    k, n = w.shape
    _check(antiquant_scale.dtype == x.dtype, "antiquant_scale dtype must match x")
    if antiquant_group_size == 0:
        ok = tuple(antiquant_scale.shape) in ((n,), (1, n), (1,))
        _check(
            ok,
            f"per-channel antiquant_scale must be (N,), (1, N) or (1,), got {tuple(antiquant_scale.shape)}",
        )
        rows = torch.zeros(k, dtype=torch.long, device=x.device)
    else:
        g = antiquant_group_size
        _check(g % 32 == 0 and 0 < g < k, f"antiquant_group_size must be a multiple of 32 in (0, K), got {g}")
        groups = math.ceil(k / g)
        _check(
            tuple(antiquant_scale.shape) == (groups, n), f"per-group antiquant_scale must be ({groups}, {n})"
        )
        rows = torch.arange(k, device=x.device) // g
    wf = w.float()
    if antiquant_offset is not None:
        _check(
            antiquant_offset.shape == antiquant_scale.shape, "antiquant_offset must have the scale's shape"
        )
        _check(antiquant_offset.dtype == x.dtype, "antiquant_offset dtype must match x")
        wf = wf + antiquant_offset.float().reshape(-1, antiquant_scale.shape[-1])[rows]
    wf = wf * antiquant_scale.float().reshape(-1, antiquant_scale.shape[-1])[rows]
    y = x.float() @ wf
    if bias is not None:
        y = y + bias.float().reshape(1, -1)
    return y.to(x.dtype)


# ------------------------------------------------------------------------------------------------ install

_EXPORTS = (
    npu_fused_infer_attention_score,
    npu_fusion_attention,
    _npu_paged_attention,
    _npu_reshape_and_cache,
    npu_rms_norm,
    npu_add_rms_norm,
    npu_rotary_mul,
    npu_swiglu,
    npu_geglu,
    npu_convert_weight_to_int4pack,
    npu_weight_quant_batchmatmul,
)


@contextlib.contextmanager
def installed() -> Iterator[types.ModuleType]:
    """Put an emulated ``torch_npu`` module into ``sys.modules`` for the block (the previous entry is restored).

    The module's ``calls`` list records every operator call made inside the block.
    """
    module = types.ModuleType("torch_npu", "Emulated torch_npu (tests/npu_emulator.py); no Ascend device.")
    for fn in _EXPORTS:
        setattr(module, fn.__name__, fn)
    _calls.clear()
    module.calls = _calls
    previous = sys.modules.get("torch_npu")
    sys.modules["torch_npu"] = module
    try:
        yield module
    finally:
        if previous is None:
            sys.modules.pop("torch_npu", None)
        else:
            sys.modules["torch_npu"] = previous
