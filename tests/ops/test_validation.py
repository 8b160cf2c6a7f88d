"""Bad inputs to optimum_atb.ops raise a ValueError that names the problem, before anything is written."""

from __future__ import annotations

import pytest
import torch

from optimum_atb import ops

F32, F16 = torch.float32, torch.float16


def qkv(b=1, sq=4, sk=4, hq=4, hkv=2, d=64, dtype=F32):
    return (
        torch.randn(b, sq, hq, d, dtype=dtype),
        torch.randn(b, sk, hkv, d, dtype=dtype),
        torch.randn(b, sk, hkv, d, dtype=dtype),
    )


def varlen(lens_q=(2, 3), lens_k=(2, 3), hq=4, hkv=2, d=64):
    q, k, v = (
        torch.randn(sum(lens_q), hq, d),
        torch.randn(sum(lens_k), hkv, d),
        torch.randn(sum(lens_k), hkv, d),
    )
    cu_q = torch.tensor([0, lens_q[0], sum(lens_q)], dtype=torch.int32)
    cu_k = torch.tensor([0, lens_k[0], sum(lens_k)], dtype=torch.int32)
    return q, k, v, cu_q, cu_k


def fa(**overrides):
    """Call flash_attention on valid inputs with some replaced."""
    q, k, v = qkv()
    args = {"q": q, "k": k, "v": v, **overrides}
    return lambda: ops.flash_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def fa_varlen(**overrides):
    q, k, v, cu_q, cu_k = varlen()
    args = {"q": q, "k": k, "v": v, "cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k, **overrides}
    return lambda: ops.flash_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


FLASH_CASES = [
    (
        "heads-not-divisible",
        fa(k=torch.randn(1, 4, 3, 64), v=torch.randn(1, 4, 3, 64)),
        "multiple of key/value heads",
    ),
    ("mixed-dtypes", fa(k=torch.randn(1, 4, 2, 64, dtype=F16)), "dtypes must match"),
    ("int-dtype", fa(q=torch.ones(1, 4, 4, 64, dtype=torch.int64)), "float32, float16 or bfloat16"),
    ("mixed-devices", fa(v=torch.randn(1, 4, 2, 64, device="meta")), "one device"),
    ("wrong-rank", fa(q=torch.randn(4, 4, 64)), "must have 4 dimensions"),
    (
        "head-dim-too-big",
        fa(q=torch.randn(1, 4, 4, 320), k=torch.randn(1, 4, 2, 320), v=torch.randn(1, 4, 2, 320)),
        "head_dim must be in 1..256",
    ),
    ("head-dim-mismatch", fa(k=torch.randn(1, 4, 2, 32), v=torch.randn(1, 4, 2, 32)), "head_dim mismatch"),
    ("k-v-shapes", fa(v=torch.randn(1, 5, 2, 64)), "same shape"),
    ("batch-mismatch", fa(k=torch.randn(2, 4, 2, 64), v=torch.randn(2, 4, 2, 64)), "batch mismatch"),
    ("window-zero", fa(sliding_window=0), "sliding_window must be a positive int"),
    ("window-float", fa(sliding_window=2.5), "sliding_window must be a positive int"),
    ("softcap-negative", fa(softcap=-1.0), "softcap must be a finite positive"),
    ("softcap-inf", fa(softcap=float("inf")), "softcap must be a finite positive"),
    ("scale-zero", fa(scale=0.0), "scale must be a finite positive"),
    ("dropout-out-of-range", fa(dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
    ("dropout-without-autograd", fa(dropout_p=0.1), "needs autograd"),
    ("alibi-shape", fa(alibi_slopes=torch.ones(3)), "alibi_slopes must have shape"),
    ("mask-float", fa(attn_mask=torch.zeros(1, 1, 4, 4)), "attn_mask must be bool"),
    ("mask-shape", fa(attn_mask=torch.ones(1, 1, 4, 5, dtype=torch.bool)), "does not broadcast"),
    ("cu-seqlens-int64", fa_varlen(cu_seqlens_q=torch.tensor([0, 2, 5])), "cu_seqlens_q must be int32"),
    ("cu-seqlens-one-missing", fa_varlen(cu_seqlens_k=None), "needs both cu_seqlens_q and cu_seqlens_k"),
    (
        "cu-seqlens-not-from-zero",
        fa_varlen(cu_seqlens_q=torch.tensor([1, 2, 5], dtype=torch.int32)),
        "must start at 0",
    ),
    (
        "cu-seqlens-decreasing",
        fa_varlen(cu_seqlens_k=torch.tensor([0, 4, 3], dtype=torch.int32)),
        "non-decreasing",
    ),
    (
        "cu-seqlens-wrong-total",
        fa_varlen(cu_seqlens_q=torch.tensor([0, 2, 4], dtype=torch.int32)),
        "end at the packed length 5",
    ),
    (
        "cu-seqlens-lengths",
        fa_varlen(cu_seqlens_k=torch.tensor([0, 5], dtype=torch.int32)),
        "same length B\\+1",
    ),
    ("max-seqlen-too-small", fa_varlen(max_seqlen_q=2), "longer than its max_seqlen"),
    ("varlen-with-mask", fa_varlen(attn_mask=torch.ones(5, 5, dtype=torch.bool)), "not supported in varlen"),
]


@pytest.mark.parametrize("call,message", [pytest.param(*c[1:], id=c[0]) for c in FLASH_CASES])
def test_flash_attention_rejects(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_dropout_accepted_under_autograd():
    q, k, v = (t.requires_grad_() for t in qkv())
    out = ops.flash_attention(q, k, v, dropout_p=0.5)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_default_scale_is_inverse_sqrt_head_dim():
    from optimum_atb import _validate

    q, k, v = qkv(d=80)
    args = (None, None, None, None, None, None, None, None, None, 0.0)
    assert _validate.check_flash_attention(q, k, v, *args) == pytest.approx(80**-0.5)


def paged(b=2, sq=1, hq=4, hkv=2, d=64, block_size=16, num_blocks=6, blocks=2):
    q = torch.randn(b, sq, hq, d)
    k_cache, v_cache = (
        torch.randn(num_blocks, block_size, hkv, d),
        torch.randn(num_blocks, block_size, hkv, d),
    )
    table = torch.arange(b * blocks, dtype=torch.int32).view(b, blocks)
    return q, k_cache, v_cache, table, torch.tensor([20, 5][:b], dtype=torch.int32)


def pa(**overrides):
    q, k_cache, v_cache, table, lens = paged()
    args = {
        "q": q,
        "k_cache": k_cache,
        "v_cache": v_cache,
        "block_tables": table,
        "context_lens": lens,
        **overrides,
    }
    positional = [args.pop(n) for n in ("q", "k_cache", "v_cache", "block_tables", "context_lens")]
    return lambda: ops.paged_attention(*positional, **args)


PAGED_CASES = [
    (
        "block-tables-int64",
        pa(block_tables=torch.zeros(2, 2, dtype=torch.int64)),
        "block_tables must be int32",
    ),
    ("context-lens-int64", pa(context_lens=torch.tensor([20, 5])), "context_lens must be int32"),
    ("tables-too-short", pa(context_lens=torch.tensor([33, 5], dtype=torch.int32)), "block_tables too short"),
    (
        "context-shorter-than-queries",
        pa(q=torch.randn(2, 3, 4, 64), context_lens=torch.tensor([20, 2], dtype=torch.int32)),
        "context_lens must be >= Sq=3",
    ),
    (
        "block-index-out-of-pool",
        pa(block_tables=torch.tensor([[0, 9], [2, 3]], dtype=torch.int32)),
        "outside 0..5",
    ),
    ("heads", pa(q=torch.randn(2, 1, 3, 64)), "multiple of key/value heads"),
    ("dtypes", pa(q=torch.randn(2, 1, 4, 64, dtype=F16)), "dtypes must match"),
    ("rows-per-sequence", pa(context_lens=torch.tensor([20], dtype=torch.int32)), "one row per sequence"),
    ("cache-rank", pa(k_cache=torch.randn(6, 16, 128)), "k_cache must have 4 dimensions"),
    ("window", pa(sliding_window=-3), "sliding_window"),
]


@pytest.mark.parametrize("call,message", [pytest.param(*c[1:], id=c[0]) for c in PAGED_CASES])
def test_paged_attention_rejects(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_paged_attention_ignores_unused_table_entries():
    """Only the blocks a context needs are checked: spare entries may hold anything (e.g. -1)."""
    q, k_cache, v_cache, table, lens = paged()
    table[1, 1] = -1  # sequence 1 has 5 keys: one block
    assert ops.paged_attention(q, k_cache, v_cache, table, lens).shape == q.shape


CACHE_CASES = [
    ("slot-out-of-range", {"slot_mapping": torch.tensor([0, 1, 64])}, "slot >= the pool's 64 slots"),
    ("slot-dtype", {"slot_mapping": torch.tensor([0.0, 1.0, 2.0])}, "slot_mapping must be int32 or int64"),
    ("slot-count", {"slot_mapping": torch.tensor([0, 1])}, "2 slots for 3 tokens"),
    ("k-dtype", {"k": torch.randn(3, 2, 64, dtype=F16)}, "dtypes must match"),
    ("k-heads", {"k": torch.randn(3, 4, 64), "v": torch.randn(3, 4, 64)}, "do not fit the pool"),
    ("k-rank", {"k": torch.randn(1, 3, 2, 64)}, "k must have 3 dimensions"),
    ("device", {"slot_mapping": torch.tensor([0, 1, 2], device="meta")}, "one device"),
]


@pytest.mark.parametrize("overrides,message", [pytest.param(*c[1:], id=c[0]) for c in CACHE_CASES])
def test_reshape_and_cache_rejects_without_writing(overrides, message):
    k_cache, v_cache = torch.randn(4, 16, 2, 64), torch.randn(4, 16, 2, 64)
    before = (k_cache.clone(), v_cache.clone())
    args = {"k": torch.randn(3, 2, 64), "v": torch.randn(3, 2, 64), "slot_mapping": torch.tensor([0, 17, 40])}
    args.update(overrides)
    with pytest.raises(ValueError, match=message):
        ops.reshape_and_cache(args["k"], args["v"], k_cache, v_cache, args["slot_mapping"])
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1]), "the pool was written"


def test_reshape_and_cache_rejects_non_contiguous_pool():
    pool = torch.randn(4, 2, 16, 64).transpose(1, 2)  # [4, 16, 2, 64] view, not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        ops.reshape_and_cache(
            torch.randn(3, 2, 64), torch.randn(3, 2, 64), pool, pool.clone(), torch.tensor([0, 1, 2])
        )


NORM_CASES = [
    ("weight-size", lambda: ops.rms_norm(torch.randn(2, 8), torch.ones(7)), "weight has 7 elements"),
    (
        "residual-shape",
        lambda: ops.rms_norm(torch.randn(2, 8), torch.ones(8), residual=torch.randn(8)),
        "residual shape",
    ),
    (
        "residual-dtype",
        lambda: ops.layer_norm(torch.randn(2, 8), None, residual=torch.randn(2, 8, dtype=F16)),
        "dtypes must match",
    ),
    (
        "bias-size",
        lambda: ops.layer_norm(torch.randn(2, 8), torch.ones(8), torch.ones(5)),
        "bias must be a float tensor of 8",
    ),
    (
        "int-input",
        lambda: ops.rms_norm(torch.ones(2, 8, dtype=torch.int32), torch.ones(8)),
        "float32, float16 or bfloat16",
    ),
    ("glu-odd-packed", lambda: ops.swiglu(torch.randn(2, 7)), "must be even"),
    ("glu-shapes", lambda: ops.geglu(torch.randn(2, 8), torch.randn(2, 6)), "same shape"),
    ("glu-approximate", lambda: ops.geglu(torch.randn(2, 8), approximate="erf"), "approximate must be"),
    ("linear-in-features", lambda: ops.linear(torch.randn(2, 8), torch.randn(4, 7)), r"does not fit weight"),
    ("linear-bias", lambda: ops.linear(torch.randn(2, 8), torch.randn(4, 8), torch.randn(3)), "bias must"),
    (
        "linear-dtypes",
        lambda: ops.linear(torch.randn(2, 8), torch.randn(4, 8, dtype=F16)),
        "dtypes must match",
    ),
]


@pytest.mark.parametrize("call,message", [pytest.param(*c[1:], id=c[0]) for c in NORM_CASES])
def test_norm_and_glu_reject(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def rot(**overrides):
    args = {
        "q": torch.randn(1, 5, 4, 64),
        "k": torch.randn(1, 5, 2, 64),
        "cos": torch.randn(1, 5, 64),
        "sin": torch.randn(1, 5, 64),
    }
    args.update(overrides)
    return lambda: ops.apply_rotary(args.pop("q"), args.pop("k"), args.pop("cos"), args.pop("sin"), **args)


ROTARY_CASES = [
    ("odd-rotary-dim", rot(cos=torch.randn(1, 5, 63), sin=torch.randn(1, 5, 63)), "must be even"),
    ("rotary-dim-vs-cos", rot(rotary_dim=32), "rotary_dim=32 but cos/sin have 64"),
    ("cos-seq-len", rot(cos=torch.randn(1, 4, 64), sin=torch.randn(1, 4, 64)), r"\[B or 1, S, rotary_dim\]"),
    ("cos-sin-shapes", rot(sin=torch.randn(1, 5, 32)), "same shape"),
    ("q-k-seq", rot(k=torch.randn(1, 4, 2, 64)), "share batch, seq and head_dim"),
    ("xpos-without-positions", rot(xpos_scale_base=512.0), "needs positions"),
    ("positions-without-xpos", rot(positions=torch.zeros(1, 5)), "only used with xpos_scale_base"),
    ("xpos-base", rot(xpos_scale_base=0.0, positions=torch.zeros(1, 5)), "xpos_scale_base must be"),
]


@pytest.mark.parametrize("call,message", [pytest.param(*c[1:], id=c[0]) for c in ROTARY_CASES])
def test_apply_rotary_rejects(call, message):
    with pytest.raises(ValueError, match=message):
        call()
