"""Every operator on every backend against the float64 reference (``kernels/reference.py``).

Shapes are odd on purpose (S in {1, 7, 129}, D in {64, 80, 128}, GQA/MQA/MHA) and sampled through small
explicit case lists rather than a full product, so the Triton interpreter stays affordable on CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

import optimum_atb
from optimum_atb import ops
from optimum_atb.kernels import reference as ref

from .backends import GRAD_BACKENDS, backend_fixture, require_kernel
from .tolerances import assert_close

backend = backend_fixture()
grad_backend = backend_fixture(GRAD_BACKENDS)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def rand(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale).to(dtype)


def padding_mask(batch: int, sq: int, sk: int, pads: list[int]) -> torch.Tensor:
    """bool [B,1,1,Sk]: sequence b's first pads[b] keys are left padding."""
    keep = torch.arange(sk).view(1, sk) >= torch.tensor(pads).view(batch, 1)
    return keep.view(batch, 1, 1, sk)


def attn_options(opts: dict, batch: int, sq: int, sk: int, hq: int) -> dict:
    """Materialise the symbolic options of a case (alibi / masks) as tensors."""
    out = dict(opts)
    alibi = out.pop("alibi", None)
    if alibi == "heads":
        out["alibi_slopes"] = ref.alibi_slopes(hq)
    elif alibi == "batch":
        out["alibi_slopes"] = torch.rand(batch, hq) * 0.5
    mask = out.pop("mask", None)
    if mask == "padding":
        out["attn_mask"] = padding_mask(batch, sq, sk, [0, 3][:batch])
    elif mask == "random":
        m = torch.rand(batch, hq, sq, sk) > 0.4
        m[0, 0, min(2, sq - 1)] = False  # one query row sees nothing
        out["attn_mask"] = m
    return out


# (id, B, Sq, Sk, Hq, Hkv, D, dtype, options, check lse)
ATTENTION_CASES = [
    ("causal-square-mqa", 2, 7, 7, 4, 1, 64, F32, {}, True),
    ("noncausal-mha", 1, 7, 7, 4, 4, 80, F16, {"causal": False}, False),
    ("decode-gqa", 2, 1, 129, 8, 4, 128, BF16, {}, True),
    # half-precision decode past 160 batch x keys: the torch backend's matmul form instead of SDPA
    ("decode-gqa-matmul", 2, 1, 129, 9, 3, 64, BF16, {}, False),
    ("decode-padding-matmul", 2, 1, 129, 8, 2, 80, F16, {"mask": "padding"}, False),
    ("decode-window-random-mask", 2, 1, 129, 4, 1, 64, BF16, {"mask": "random", "sliding_window": 20}, False),
    ("chunk-bottom-right", 1, 7, 129, 8, 4, 64, F32, {}, False),
    ("more-queries-than-keys", 1, 129, 7, 4, 1, 80, F32, {}, True),
    ("window-shorter", 1, 129, 129, 4, 1, 64, BF16, {"sliding_window": 16}, False),
    ("window-longer", 2, 7, 7, 1, 1, 128, F16, {"sliding_window": 200}, False),
    ("window-noncausal", 1, 7, 129, 4, 4, 64, F32, {"causal": False, "sliding_window": 5}, True),
    ("alibi", 1, 129, 129, 8, 4, 64, F32, {"alibi": "heads"}, False),
    ("alibi-per-batch", 2, 7, 129, 4, 1, 80, BF16, {"alibi": "batch"}, True),
    ("softcap", 1, 129, 129, 4, 4, 128, F16, {"softcap": 5.0}, False),
    (
        "softcap-window-alibi",
        2,
        7,
        7,
        8,
        4,
        64,
        F32,
        {"softcap": 2.0, "sliding_window": 3, "alibi": "heads"},
        True,
    ),
    ("padding-mask-causal", 2, 7, 7, 4, 1, 64, F16, {"mask": "padding"}, True),
    ("random-mask-noncausal", 2, 7, 129, 4, 4, 80, BF16, {"mask": "random", "causal": False}, False),
    ("custom-scale-one-head", 1, 1, 7, 1, 1, 128, F32, {"scale": 0.3}, True),
]


@pytest.mark.parametrize(
    "b,sq,sk,hq,hkv,d,dtype,opts,lse", [pytest.param(*c[1:], id=c[0]) for c in ATTENTION_CASES]
)
def test_flash_attention(backend, b, sq, sk, hq, hkv, d, dtype, opts, lse):
    require_kernel("flash_attention", backend)
    # softcap only bites on large scores: widen q so tanh saturates for part of them
    q = rand(b, sq, hq, d, dtype=dtype, scale=4.0 if "softcap" in opts else 1.0)
    k, v = rand(b, sk, hkv, d, dtype=dtype), rand(b, sk, hkv, d, dtype=dtype)
    kwargs = attn_options(opts, b, sq, sk, hq)
    saved = [t.clone() for t in (q, k, v)]
    want, want_lse = ref.flash_attention(q, k, v, return_lse=True, **kwargs)

    got = ops.flash_attention(q, k, v, return_lse=lse, **kwargs)
    out, got_lse = got if lse else (got, None)

    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, want, dtype, what="out")
    empty = torch.isinf(want_lse).transpose(1, 2)  # [B,Sq,Hq]: rows that see no key
    assert torch.all(out[empty] == 0), "a query row that sees no key must return zeros"
    if lse:
        assert got_lse.dtype == torch.float32 and got_lse.shape == (b, hq, sq)
        assert_close(got_lse, want_lse, F32 if dtype == F32 else dtype, what="lse")
    assert all(torch.equal(a, s) for a, s in zip((q, k, v), saved)), "inputs were modified"
    if sq > sk and opts.get("causal", True):
        assert empty.any(), "case meant to have query rows without keys"


# (id, query lengths, key lengths, Hq, Hkv, D, dtype, options)
VARLEN_CASES = [
    ("causal-gqa", [1, 7, 3], [1, 7, 9], 8, 4, 64, F32, {}),
    ("noncausal-alibi", [7, 1], [129, 3], 4, 1, 80, BF16, {"causal": False, "alibi": "heads"}),
    ("window", [7, 7, 2], [7, 7, 2], 4, 4, 128, F16, {"sliding_window": 3}),
]


@pytest.mark.parametrize(
    "lens_q,lens_k,hq,hkv,d,dtype,opts", [pytest.param(*c[1:], id=c[0]) for c in VARLEN_CASES]
)
def test_flash_attention_varlen(backend, lens_q, lens_k, hq, hkv, d, dtype, opts):
    require_kernel("flash_attention", backend)
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = rand(sum(lens_q), hq, d, dtype=dtype)
    k, v = rand(sum(lens_k), hkv, d, dtype=dtype), rand(sum(lens_k), hkv, d, dtype=dtype)
    kwargs = attn_options(opts, len(lens_q), 0, 0, hq)
    want, want_lse = ref.flash_attention(
        q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True, **kwargs
    )

    out, lse = ops.flash_attention(
        q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k),
        return_lse=True, **kwargs,
    )  # fmt: skip

    assert out.shape == q.shape and lse.shape == (hq, sum(lens_q))
    assert_close(out, want, dtype, what="out")
    assert_close(lse, want_lse, F32 if dtype == F32 else dtype, what="lse")


# (id, B, Sq, Sk, Hq, Hkv, D, dtype, options)
GRAD_CASES = [
    ("causal-mqa", 2, 7, 7, 4, 1, 64, F32, {}),
    ("bottom-right-window", 1, 7, 129, 8, 4, 80, BF16, {"sliding_window": 16}),
    ("alibi-softcap-noncausal", 1, 7, 7, 4, 4, 128, F16, {"alibi": "heads", "softcap": 3.0, "causal": False}),
    ("padding-mask-empty-rows", 2, 7, 7, 4, 1, 64, F32, {"mask": "padding"}),
]


@pytest.mark.parametrize("b,sq,sk,hq,hkv,d,dtype,opts", [pytest.param(*c[1:], id=c[0]) for c in GRAD_CASES])
def test_flash_attention_backward(grad_backend, b, sq, sk, hq, hkv, d, dtype, opts):
    require_kernel("flash_attention", grad_backend)
    kwargs = attn_options(opts, b, sq, sk, hq)
    q = rand(b, sq, hq, d, dtype=dtype, scale=3.0 if "softcap" in opts else 1.0)
    k, v = rand(b, sk, hkv, d, dtype=dtype), rand(b, sk, hkv, d, dtype=dtype)
    dout = rand(b, sq, hq, d, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    wants = [t.to(torch.float64).requires_grad_() for t in (q, k, v)]

    ops.flash_attention(*leaves, **kwargs).backward(dout)
    ref.flash_attention(*wants, **kwargs).backward(dout.to(torch.float64))

    for name, got, want in zip("qkv", leaves, wants):
        assert got.grad.dtype == dtype
        assert_close(got.grad, want.grad, dtype, grad=True, what=f"d{name}")


def paged_setup(b, hkv, d, dtype, block_size, context_lens, layout="scattered"):
    """A NaN-poisoned pool, block tables and contexts; spare table entries point at a NaN block.

    ``layout``: "scattered" (random blocks), "consecutive" (each row's blocks follow each other; rows in
    reverse order with random gaps) or "even" (consecutive rows at evenly spaced starts, as the allocator
    lays out a batch that grows together).
    """
    needed = [math.ceil(n / block_size) for n in context_lens]
    stride = max(needed) + 1
    num_blocks = b * stride + 3
    k_cache = torch.full((num_blocks, block_size, hkv, d), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    if layout == "scattered":
        order = torch.randperm(num_blocks - 1).tolist()
        rows = [[order.pop() for _ in range(n)] for n in needed]
    elif layout == "even":
        rows = [[1 + i * stride + j for j in range(n)] for i, n in enumerate(needed)]
    else:
        rows, start = [], 0
        for n in reversed(needed):
            start += int(torch.randint(0, 2, ()))
            rows.insert(0, list(range(start, start + n)))
            start += n
    table = torch.full((b, max(needed) + 1), num_blocks - 1, dtype=torch.int32)  # block num_blocks - 1: NaN
    for i, n in enumerate(context_lens):
        for j, blk in enumerate(rows[i]):
            table[i, j] = blk
            used = min(block_size, n - j * block_size)
            k_cache[blk, :used] = rand(used, hkv, d, dtype=dtype)
            v_cache[blk, :used] = rand(used, hkv, d, dtype=dtype)
    return k_cache, v_cache, table, torch.tensor(context_lens, dtype=torch.int32)


# (id, B, Sq, Hq, Hkv, D, dtype, block_size, context_lens, options)
PAGED_CASES = [
    ("decode-bs16-gqa", 3, 1, 8, 4, 64, F32, 16, [5, 40, 129], {}),
    ("decode-bs32-mqa", 2, 1, 4, 1, 128, BF16, 32, [129, 1], {}),
    ("verify3-bs16-mha", 3, 3, 4, 4, 80, F16, 16, [3, 17, 64], {}),
    ("verify3-bs32-window-alibi", 2, 3, 8, 4, 64, F32, 32, [70, 9], {"sliding_window": 8, "alibi": "heads"}),
    ("decode-bs16-softcap", 2, 1, 4, 1, 80, BF16, 16, [33, 16], {"softcap": 4.0}),
    # equal contexts (no padding): the torch backend gathers only the visible keys and runs without a mask
    ("decode-equal-window", 3, 1, 8, 2, 64, F32, 16, [45, 45, 45], {"sliding_window": 20}),
    (
        "verify4-equal-window-alibi",
        2,
        4,
        4,
        2,
        64,
        F32,
        16,
        [37, 37],
        {"sliding_window": 9, "alibi": "heads"},
    ),
    ("prefill-equal-bs16", 2, 19, 4, 2, 64, BF16, 16, [19, 19], {}),
    # half-precision decode past 160 batch x keys (torch backend: matmul form, on views of the pool)
    ("decode-equal-matmul", 4, 1, 9, 3, 64, BF16, 16, [70, 70, 70, 70], {}),
    ("decode-uneven-matmul", 2, 1, 8, 2, 64, F16, 16, [200, 90], {}),
]


@pytest.mark.parametrize(
    "b,sq,hq,hkv,d,dtype,block_size,context_lens,opts", [pytest.param(*c[1:], id=c[0]) for c in PAGED_CASES]
)
@pytest.mark.parametrize("layout", ["scattered", "consecutive", "even"])
def test_paged_attention(backend, b, sq, hq, hkv, d, dtype, block_size, context_lens, opts, layout):
    require_kernel("paged_attention", backend)
    k_cache, v_cache, table, lens = paged_setup(b, hkv, d, dtype, block_size, context_lens, layout)
    q = rand(b, sq, hq, d, dtype=dtype, scale=4.0 if "softcap" in opts else 1.0)
    kwargs = attn_options(opts, b, sq, 0, hq)
    want = ref.paged_attention(q, k_cache, v_cache, table, lens, **kwargs)

    out = ops.paged_attention(q, k_cache, v_cache, table, lens, **kwargs)

    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, want, dtype, what="paged out")  # NaN here = a key past context_lens was read


# (id, tokens, Hkv, D, dtype, block_size, slot dtype)
CACHE_CASES = [
    ("mqa-bs16-int64", 7, 1, 64, F32, 16, torch.int64),
    ("gqa-bs32-int32", 7, 4, 80, BF16, 32, torch.int32),
    ("decode-bs16-fp16", 3, 4, 128, F16, 16, torch.int32),
]


@pytest.mark.parametrize(
    "t,hkv,d,dtype,block_size,slot_dtype", [pytest.param(*c[1:], id=c[0]) for c in CACHE_CASES]
)
def test_reshape_and_cache(backend, t, hkv, d, dtype, block_size, slot_dtype):
    require_kernel("reshape_and_cache", backend)
    num_blocks = 4
    k_cache = rand(num_blocks, block_size, hkv, d, dtype=dtype)
    v_cache = rand(num_blocks, block_size, hkv, d, dtype=dtype)
    slots = torch.randperm(num_blocks * block_size)[:t]
    slots[1] = -1  # padding tokens: not written anywhere
    slots[-1] = -1
    flat_k, flat_v = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
    flat_k[slots[slots >= 0]] = float("nan")  # poison every slot that must be written
    flat_v[slots[slots >= 0]] = float("nan")
    k, v = rand(t, hkv, d, dtype=dtype), rand(t, hkv, d, dtype=dtype)
    want_k, want_v = ref.reshape_and_cache(k, v, k_cache, v_cache, slots)
    assert not want_k.isnan().any()

    assert ops.reshape_and_cache(k, v, k_cache, v_cache, slots.to(slot_dtype)) is None

    assert torch.equal(k_cache, want_k), "key pool: a slot was missed, or something else changed"
    assert torch.equal(v_cache, want_v), "value pool: a slot was missed, or something else changed"


# (id, shape, dtype, residual, offset)
RMS_CASES = [
    ("llama-fp32", (2, 7, 80), F32, False, 0.0),
    ("llama-bf16-residual", (1, 129, 576), BF16, True, 0.0),
    ("gemma-fp16", (7, 129), F16, False, 1.0),
    ("gemma-bf16-residual", (2, 1, 64), BF16, True, 1.0),
]


@pytest.mark.parametrize("shape,dtype,residual,offset", [pytest.param(*c[1:], id=c[0]) for c in RMS_CASES])
def test_rms_norm(backend, shape, dtype, residual, offset):
    require_kernel("rms_norm", backend)
    x, w = rand(*shape, dtype=dtype, scale=3.0), rand(shape[-1], dtype=dtype)
    res = rand(*shape, dtype=dtype) if residual else None

    got = ops.rms_norm(x, w, 1e-6, residual=res, offset=offset)

    if residual:
        got, h = got
        assert torch.equal(h, x + res), "the residual sum must be x + residual in x's dtype"
        x = x + res
    assert got.dtype == dtype
    assert_close(got, ref.rms_norm(x, w, 1e-6, offset=offset), dtype, what="rms_norm")


# (id, shape, dtype, weight, bias, residual)
LAYER_NORM_CASES = [
    ("affine-fp32", (2, 7, 80), F32, True, True, False),
    ("no-bias-bf16-residual", (129, 576), BF16, True, False, True),
    ("no-affine-fp16", (1, 7, 129), F16, False, False, False),
]


@pytest.mark.parametrize(
    "shape,dtype,weight,bias,residual", [pytest.param(*c[1:], id=c[0]) for c in LAYER_NORM_CASES]
)
def test_layer_norm(backend, shape, dtype, weight, bias, residual):
    require_kernel("layer_norm", backend)
    x = rand(*shape, dtype=dtype, scale=2.0) + 0.5
    w = rand(shape[-1], dtype=dtype) if weight else None
    bb = rand(shape[-1], dtype=dtype) if bias else None
    res = rand(*shape, dtype=dtype) if residual else None

    got = ops.layer_norm(x, w, bb, 1e-5, residual=res)

    if residual:
        got, h = got
        assert torch.equal(h, x + res)
        x = x + res
    assert got.dtype == dtype
    assert_close(got, ref.layer_norm(x, w, bb, 1e-5), dtype, what="layer_norm")


def rotary_tables(batch, s, rotary_dim, interleaved, max_pos=4096, base=10000.0):
    """cos/sin [batch, S, R] as the model's rotary module lays them out, at random positions < max_pos."""
    pos = torch.randint(0, max_pos, (batch, s)).to(torch.float64)
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = pos.unsqueeze(-1) * inv_freq  # [batch, S, R/2]
    table = angles.repeat_interleave(2, dim=-1) if interleaved else torch.cat((angles, angles), dim=-1)
    return table.cos(), table.sin(), pos


# (id, B, S, Hq, Hkv, D, rotary_dim, interleaved, xpos base, cos batch, dtype)
ROTARY_CASES = [
    ("full-halves", 2, 7, 4, 1, 64, 64, False, None, 1, F32),
    ("partial-halves", 2, 7, 8, 4, 80, 32, False, None, 2, BF16),
    ("interleaved", 1, 129, 4, 4, 128, 128, True, None, 1, F16),
    ("interleaved-partial", 1, 1, 4, 1, 80, 64, True, None, 1, F32),
    ("xpos-halves", 2, 7, 4, 4, 64, 64, False, 512.0, 2, F32),
    ("xpos-interleaved-partial", 1, 7, 8, 4, 128, 64, True, 256.0, 1, BF16),
]


@pytest.mark.parametrize(
    "b,s,hq,hkv,d,rdim,interleaved,xpos,cos_b,dtype", [pytest.param(*c[1:], id=c[0]) for c in ROTARY_CASES]
)
def test_apply_rotary(backend, b, s, hq, hkv, d, rdim, interleaved, xpos, cos_b, dtype):
    require_kernel("apply_rotary", backend)
    q, k = rand(b, s, hq, d, dtype=dtype), rand(b, s, hkv, d, dtype=dtype)
    # xPos decays by zeta ** (pos / base): keep positions within two bases so the factors stay in ~[0.08, 12]
    cos, sin, pos = rotary_tables(cos_b, s, rdim, interleaved, max_pos=int(2 * xpos) if xpos else 4096)
    cos, sin = cos.to(dtype), sin.to(dtype)
    positions = pos.to(torch.int64) if xpos else None
    saved = (q.clone(), k.clone())
    kwargs = dict(interleaved=interleaved, rotary_dim=rdim, xpos_scale_base=xpos, positions=positions)
    want_q, want_k = ref.apply_rotary(q, k, cos, sin, **kwargs)

    got_q, got_k = ops.apply_rotary(q, k, cos, sin, **kwargs)

    assert got_q.dtype == dtype and got_k.dtype == dtype
    assert_close(got_q, want_q, dtype, what="q")
    assert_close(got_k, want_k, dtype, what="k")
    assert torch.equal(got_q[..., rdim:], q[..., rdim:]), "channels past rotary_dim must pass through"
    assert torch.equal(q, saved[0]) and torch.equal(k, saved[1]), "inputs were modified"


# (id, op, approximate, packed, shape, dtype)
GLU_CASES = [
    ("swiglu-fp32", "swiglu", None, False, (2, 7, 80), F32),
    ("swiglu-packed-bf16", "swiglu", None, True, (7, 2 * 129), BF16),
    ("geglu-tanh-fp16", "geglu", "tanh", False, (1, 129, 64), F16),
    ("geglu-erf-packed-fp32", "geglu", "none", True, (3, 2 * 80), F32),
]


@pytest.mark.parametrize(
    "op,approximate,packed,shape,dtype", [pytest.param(*c[1:], id=c[0]) for c in GLU_CASES]
)
def test_glu(backend, op, approximate, packed, shape, dtype):
    require_kernel(op, backend)
    gate = rand(*shape, dtype=dtype, scale=2.0)
    up = None if packed else rand(*shape, dtype=dtype)
    extra = {} if approximate is None else {"approximate": approximate}

    got = getattr(ops, op)(gate, up, **extra)

    want = getattr(ref, op)(gate, up, **extra)
    assert got.dtype == dtype and got.shape == want.shape
    assert_close(got, want, dtype, what=op)


# (leading shape of x, in, out): 1..8 rows take the small-row form on the CPU in fp32, more rows F.linear
LINEAR_SHAPES = [
    ((1, 1), 37, 29),
    ((2,), 37, 29),
    ((1, 3), 64, 48),
    ((5,), 37, 29),
    ((2, 4), 40, 24),
    ((9,), 37, 29),
]


class _ForcedForm(dict):
    """Stands in for torch_ops' calibration table: every shape is 'calibrated' to one form."""

    def __init__(self, weight_first: bool) -> None:
        super().__init__()
        self.weight_first = weight_first

    def __contains__(self, key) -> bool:
        return True

    def get(self, key, default=None):
        return self.weight_first


@pytest.mark.parametrize("lead,k,n", LINEAR_SHAPES)
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("bias", [False, True])
def test_linear(backend, lead, k, n, dtype, bias):
    require_kernel("linear", backend)
    x, w = rand(*lead, k, dtype=dtype), rand(n, k, dtype=dtype)
    b = rand(n, dtype=dtype) if bias else None

    got = ops.linear(x, w, b)

    assert got.dtype == dtype and got.shape == (*lead, n) and got.is_contiguous()
    assert_close(got, ref.linear(x, w, b), dtype, what="linear")


@pytest.mark.parametrize("weight_first", [True, False])
@pytest.mark.parametrize("lead,k,n", LINEAR_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_torch_linear_small_row_forms(monkeypatch, weight_first, lead, k, n, bias):
    """Both forms the CPU calibration can pick (this CPU's choice is what test_linear checks)."""
    from optimum_atb.kernels import torch_ops

    monkeypatch.setattr(torch_ops, "_weight_first_faster", _ForcedForm(weight_first))
    x, w = rand(*lead, k, dtype=F32), rand(n, k, dtype=F32)
    b = rand(n, dtype=F32) if bias else None
    got = ops.linear(x, w, b)
    assert got.shape == (*lead, n) and got.is_contiguous()
    assert_close(got, ref.linear(x, w, b), F32, what="linear")


def test_linear_form_is_timed_once_per_shape_and_the_faster_one_kept(monkeypatch):
    from optimum_atb.kernels import torch_ops

    table: dict = {}
    monkeypatch.setattr(torch_ops, "_weight_first_faster", table)
    timed = []

    def fake_seconds(form, weights, flat, repeats=3):  # the weight @ x^T form "faster" for 1-2 rows only
        timed.append(form)
        if form is torch_ops._weight_first:
            return 0.5 if flat.shape[0] <= 2 else 2.0
        return 1.0

    monkeypatch.setattr(torch_ops, "_seconds", fake_seconds)
    w = torch.randn(29, 37)
    ops.linear(torch.randn(3, 37), w)
    assert table == {(29, 37, rows): rows <= 2 for rows in range(1, torch_ops.SMALL_GEMM_ROWS + 1)}
    calls = len(timed)
    ops.linear(torch.randn(1, 37), w)
    ops.linear(torch.randn(20, 37), w)
    assert len(timed) == calls  # once per shape


def test_linear_gradients_match_f_linear():
    x = torch.randn(3, 37, requires_grad=True)
    w = torch.randn(29, 37, requires_grad=True)
    ops.linear(x, w).square().sum().backward()
    gx, gw = x.grad, w.grad
    x.grad = w.grad = None
    torch.nn.functional.linear(x, w).square().sum().backward()
    torch.testing.assert_close(gx, x.grad, atol=1e-4, rtol=1e-4)  # the same sums in another order
    torch.testing.assert_close(gw, w.grad, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- torch backend: exactly stock transformers


@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_torch_rms_norm_is_bit_exact_with_llama_and_gemma(dtype):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, res = rand(3, 7, 80, dtype=dtype, scale=3.0), rand(3, 7, 80, dtype=dtype)
    llama, gemma = LlamaRMSNorm(80, eps=1e-5).to(dtype), GemmaRMSNorm(80, eps=1e-6).to(dtype)
    with torch.no_grad():
        llama.weight.copy_(rand(80, dtype=dtype))
        gemma.weight.copy_(rand(80, dtype=dtype) * 0.1)
        with optimum_atb.use_backend("torch"):
            got_llama = ops.rms_norm(x, llama.weight, 1e-5)
            got_gemma, h = ops.rms_norm(x, gemma.weight, 1e-6, residual=res, offset=1.0)
        assert torch.equal(got_llama, llama(x))
        assert torch.equal(got_gemma, gemma(x + res))
        assert torch.equal(h, x + res)


def test_torch_rotary_is_bit_exact_with_llama_in_fp32():
    dtype = F32
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = rand(2, 7, 4, 64, dtype=dtype), rand(2, 7, 2, 64, dtype=dtype)
    cos, sin, _ = rotary_tables(2, 7, 64, interleaved=False)
    cos, sin = cos.to(dtype), sin.to(dtype)
    want_q, want_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    with optimum_atb.use_backend("torch"):
        got_q, got_k = ops.apply_rotary(q, k, cos, sin)
    assert torch.equal(got_q, want_q.transpose(1, 2)) and torch.equal(got_k, want_k.transpose(1, 2))
