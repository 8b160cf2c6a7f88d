"""Input checks for :mod:`optimum_atb.ops`: a ``ValueError`` naming the problem, raised before any write.

Shape, dtype and device checks read only metadata. Checks on tensor *values* (slot range, block-table
coverage, cumulative lengths) read device memory: they are gathered into one boolean per call, so off
the CPU they cost exactly one device->host sync per call (paged_attention, reshape_and_cache, varlen
flash_attention); every other check is free.
"""

from __future__ import annotations

import math
import numbers

import torch

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def _tensor(name: str, t, rank: int | tuple[int, ...] | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    ranks = (rank,) if isinstance(rank, int) else rank
    if ranks is not None and t.dim() not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")


def _same_device(**tensors: torch.Tensor | None) -> None:
    given = {n: t for n, t in tensors.items() if t is not None}
    devices = {t.device for t in given.values()}
    if len(devices) > 1:
        where = ", ".join(f"{n} on {t.device}" for n, t in given.items())
        raise ValueError(f"all tensors must be on one device, got {where}")


def _float_dtype(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dtype not in _FLOATS:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) > 1:
        what = ", ".join(f"{n} {t.dtype}" for n, t in tensors.items())
        raise ValueError(f"dtypes must match, got {what}")


def _int32(name: str, t: torch.Tensor) -> None:
    if t.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {t.dtype}")


def _heads(hq: int, hkv: int, d: int, dk: int) -> None:
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if d != dk:
        raise ValueError(f"head_dim mismatch: q has {d}, k/v have {dk}")
    if not 0 < d <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM}, got {d}")


def resolve_scale(scale, head_dim: int) -> float:
    """The softmax scale: ``1/sqrt(head_dim)`` by default; a finite positive number otherwise."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite positive number, got {scale!r}")
    return float(scale)


def _window_softcap(sliding_window, softcap) -> None:
    if sliding_window is not None and (
        isinstance(sliding_window, bool)
        or not isinstance(sliding_window, numbers.Integral)
        or sliding_window < 1
    ):
        raise ValueError(
            f"sliding_window must be a positive int (keys seen, itself included), got {sliding_window!r}"
        )
    if softcap is not None and (
        not isinstance(softcap, numbers.Real) or not math.isfinite(softcap) or softcap <= 0
    ):
        raise ValueError(f"softcap must be a finite positive number, got {softcap!r}")


def _alibi(alibi_slopes, batch: int | None, hq: int) -> None:
    if alibi_slopes is None:
        return
    _tensor("alibi_slopes", alibi_slopes, (1, 2))
    if not alibi_slopes.is_floating_point():
        raise ValueError(f"alibi_slopes must be a float tensor, got {alibi_slopes.dtype}")
    shape = tuple(alibi_slopes.shape)
    if shape != (hq,) and (batch is None or shape != (batch, hq)):
        want = f"({hq},)" + ("" if batch is None else f" or ({batch}, {hq})")
        raise ValueError(f"alibi_slopes must have shape {want}, got {shape}")


def _data_ok(checks: list[tuple[torch.Tensor, str]]) -> None:
    """Raise the message of the first failing value check (one host sync for all of them)."""
    if not checks:
        return
    if bool(torch.stack([ok.reshape(()) for ok, _ in checks]).all()):
        return
    for ok, message in checks:
        if not bool(ok):
            raise ValueError(message)


def check_flash_attention(
    q, k, v, scale, sliding_window, alibi_slopes, softcap, attn_mask,
    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
) -> float:  # fmt: skip
    """Validate :func:`optimum_atb.ops.flash_attention` inputs; returns the resolved softmax scale."""
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    rank = 3 if varlen else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        _tensor(name, t, rank)
    _same_device(q=q, k=k, v=v, alibi_slopes=alibi_slopes, attn_mask=attn_mask,
                 cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)  # fmt: skip
    _float_dtype(q=q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    hq, d = q.shape[-2], q.shape[-1]
    _heads(hq, k.shape[-2], d, k.shape[-1])
    if not varlen and q.shape[0] != k.shape[0]:
        raise ValueError(f"batch mismatch: q has {q.shape[0]}, k/v have {k.shape[0]}")
    _window_softcap(sliding_window, softcap)
    if not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if dropout_p > 0 and not (
        torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    ):
        raise ValueError(
            "dropout_p > 0 is a training option and needs autograd (grad enabled and q/k/v requiring "
            "grad); pass dropout_p=0.0 for inference"
        )
    if not varlen:
        _alibi(alibi_slopes, q.shape[0], hq)
        if attn_mask is not None:
            _tensor("attn_mask", attn_mask, (2, 3, 4))
            if attn_mask.dtype != torch.bool:
                raise ValueError(f"attn_mask must be bool (True = attend), got {attn_mask.dtype}")
            target = (q.shape[0], hq, q.shape[1], k.shape[1])
            padded = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
            if any(m not in (1, t) for m, t in zip(padded, target)):
                raise ValueError(
                    f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to [B,Hq,Sq,Sk] {target}"
                )
        return resolve_scale(scale, d)

    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError("varlen attention needs both cu_seqlens_q and cu_seqlens_k")
    if attn_mask is not None:
        raise ValueError("attn_mask is not supported in varlen mode (sequences are already separated)")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _tensor(name, cu, 1)
        _int32(name, cu)
        if cu.shape[0] < 2:
            raise ValueError(f"{name} must hold B+1 >= 2 offsets, got shape {tuple(cu.shape)}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length B+1, got "
            f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}"
        )
    _alibi(alibi_slopes, cu_seqlens_q.shape[0] - 1, hq)
    checks = []
    for name, cu, total, max_len in (
        ("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
        ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k),
    ):
        lens = cu[1:] - cu[:-1]
        checks.append((cu[0] == 0, f"{name} must start at 0"))
        checks.append(((lens >= 0).all(), f"{name} must be non-decreasing"))
        checks.append((cu[-1] == total, f"{name} must end at the packed length {total}"))
        if max_len is not None:
            if not isinstance(max_len, numbers.Integral) or max_len < 0:
                raise ValueError(f"max_seqlen for {name} must be a non-negative int, got {max_len!r}")
            checks.append(
                ((lens <= max_len).all(), f"a sequence in {name} is longer than its max_seqlen {max_len}")
            )
    _data_ok(checks)
    return resolve_scale(scale, d)


def check_linear(x, weight, bias) -> None:
    """Validate :func:`optimum_atb.ops.linear` inputs (metadata only)."""
    _tensor("x", x)
    _tensor("weight", weight, 2)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x [..., {x.shape[-1] if x.dim() else '?'}] does not fit weight [out, in] = {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    _same_device(x=x, weight=weight, bias=bias)
    _float_dtype(x=x, weight=weight)


def check_paged_attention(
    q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window, alibi_slopes, softcap
) -> float:
    """Validate :func:`optimum_atb.ops.paged_attention` inputs; returns the resolved softmax scale."""
    _tensor("q", q, 4)
    _tensor("k_cache", k_cache, 4)
    _tensor("v_cache", v_cache, 4)
    _tensor("block_tables", block_tables, 2)
    _tensor("context_lens", context_lens, 1)
    _same_device(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                 context_lens=context_lens, alibi_slopes=alibi_slopes)  # fmt: skip
    _float_dtype(q=q, k_cache=k_cache, v_cache=v_cache)
    _int32("block_tables", block_tables)
    _int32("context_lens", context_lens)
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    b, sq, hq, d = q.shape
    num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
    _heads(hq, k_cache.shape[2], d, k_cache.shape[3])
    if block_tables.shape[0] != b or context_lens.shape[0] != b:
        raise ValueError(
            f"block_tables [{block_tables.shape[0]}, ...] and context_lens [{context_lens.shape[0]}] "
            f"must have one row per sequence (B={b})"
        )
    _window_softcap(sliding_window, softcap)
    _alibi(alibi_slopes, b, hq)
    capacity = block_tables.shape[1] * block_size
    needed = (context_lens.to(torch.long) + block_size - 1) // block_size
    used = torch.arange(block_tables.shape[1], device=block_tables.device) < needed.unsqueeze(1)
    bad_entry = used & ((block_tables < 0) | (block_tables >= num_blocks))
    _data_ok(
        [
            ((context_lens >= sq).all(), f"context_lens must be >= Sq={sq} (they include the new tokens)"),
            (
                (context_lens <= capacity).all(),
                f"block_tables too short: a context length exceeds {block_tables.shape[1]} blocks x "
                f"{block_size} = {capacity} keys",
            ),
            (
                ~bad_entry.any(),
                f"block_tables holds a block index outside 0..{num_blocks - 1} in a used entry",
            ),
        ]
    )
    return resolve_scale(scale, d)


def check_reshape_and_cache(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Validate :func:`optimum_atb.ops.reshape_and_cache` inputs (slots < 0 are padding)."""
    _tensor("k", k, 3)
    _tensor("v", v, 3)
    _tensor("k_cache", k_cache, 4)
    _tensor("v_cache", v_cache, 4)
    _tensor("slot_mapping", slot_mapping, 1)
    _same_device(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    _float_dtype(k=k, v=v, k_cache=k_cache, v_cache=v_cache)
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    if k.shape != v.shape or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k/v shapes {tuple(k.shape)}/{tuple(v.shape)} and pool shapes "
            f"{tuple(k_cache.shape)}/{tuple(v_cache.shape)} must match pairwise"
        )
    if tuple(k.shape[1:]) != tuple(k_cache.shape[2:]):
        raise ValueError(
            f"k/v [T, Hkv, D] = {tuple(k.shape)} do not fit the pool [blocks, block_size, Hkv, D] = "
            f"{tuple(k_cache.shape)}"
        )
    if slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} slots for {k.shape[0]} tokens")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous (they are written through a flat view)")
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    _data_ok(
        [((slot_mapping < num_slots).all(), f"slot_mapping holds a slot >= the pool's {num_slots} slots")]
    )


def check_norm(x, weight, residual, bias=None) -> None:
    """Validate rms_norm / layer_norm inputs (weight/bias may be None for layer_norm; their dtype may differ)."""
    _tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    _float_dtype(x=x)
    if weight is not None:
        _tensor("weight", weight, 1)
        if not weight.is_floating_point():
            raise ValueError(f"weight must be a float tensor, got {weight.dtype}")
        if weight.shape[0] != x.shape[-1]:
            raise ValueError(f"weight has {weight.shape[0]} elements, x's last dim is {x.shape[-1]}")
    if bias is not None:
        _tensor("bias", bias, 1)
        if bias.shape[0] != x.shape[-1] or not bias.is_floating_point():
            raise ValueError(
                f"bias must be a float tensor of {x.shape[-1]} elements, got {bias.dtype} {tuple(bias.shape)}"
            )
    if residual is not None:
        _tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        _float_dtype(x=x, residual=residual)
    _same_device(x=x, weight=weight, bias=bias, residual=residual)


def check_rotary(q, k, cos, sin, rotary_dim, xpos_scale_base, positions) -> None:
    """Validate :func:`optimum_atb.ops.apply_rotary` inputs."""
    _tensor("q", q, 4)
    _tensor("k", k, 4)
    _tensor("cos", cos, 3)
    _tensor("sin", sin, 3)
    _same_device(q=q, k=k, cos=cos, sin=sin, positions=positions)
    _float_dtype(q=q, k=k)
    if not (cos.is_floating_point() and sin.is_floating_point()):
        raise ValueError(f"cos/sin must be float tensors, got {cos.dtype}/{sin.dtype}")
    b, s, _, d = q.shape
    if k.shape[0] != b or k.shape[1] != s or k.shape[3] != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch, seq and head_dim")
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    if cos.shape[0] not in (1, b) or cos.shape[1] != s:
        raise ValueError(f"cos/sin must be [B or 1, S, rotary_dim] with B={b}, S={s}, got {tuple(cos.shape)}")
    r = cos.shape[-1] if rotary_dim is None else rotary_dim
    if r != cos.shape[-1]:
        raise ValueError(f"rotary_dim={rotary_dim} but cos/sin have {cos.shape[-1]} channels")
    if r % 2 or not 0 < r <= d:
        raise ValueError(f"rotary_dim must be even and in 2..head_dim={d}, got {r}")
    if xpos_scale_base is None:
        if positions is not None:
            raise ValueError("positions is only used with xpos_scale_base")
        return
    if (
        not isinstance(xpos_scale_base, numbers.Real)
        or not math.isfinite(xpos_scale_base)
        or xpos_scale_base <= 0
    ):
        raise ValueError(f"xpos_scale_base must be a finite positive number, got {xpos_scale_base!r}")
    if positions is None:
        raise ValueError("xpos_scale_base needs positions [B or 1, S]")
    _tensor("positions", positions, 2)
    if positions.shape[0] not in (1, b) or positions.shape[1] != s:
        raise ValueError(f"positions must be [B or 1, S] with B={b}, S={s}, got {tuple(positions.shape)}")


def check_glu(gate, up) -> None:
    """Validate swiglu / geglu inputs (``up=None``: gate holds cat(gate, up) on the last dim)."""
    _tensor("gate", gate)
    if gate.dim() < 1:
        raise ValueError("gate must have at least one dimension")
    if up is None:
        _float_dtype(gate=gate)
        if gate.shape[-1] % 2:
            raise ValueError(
                f"with up=None the last dim holds cat(gate, up) and must be even, got {gate.shape[-1]}"
            )
        return
    _tensor("up", up)
    _same_device(gate=gate, up=up)
    _float_dtype(gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
