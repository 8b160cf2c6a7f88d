"""Triton-specific paths, run on CPU in Triton's interpreter (TRITON_INTERPRET=1, set by conftest).

The cross-backend suite (test_ops.py) checks every op's semantics; here: small tiles so that sequences end
in ragged tiles, split-K paged attention over several partitions, head_dim 80/96 (padded to 128), strided
(non-contiguous) inputs, varlen with empty sequences, and outputs allocated poisoned (NaN) to prove that
every element is written. The oracle is the float64 reference in ``kernels/reference.py``.
"""

from __future__ import annotations

import pytest
import torch

from optimum_atb import ops
from optimum_atb.backends import use_backend
from optimum_atb.kernels import reference as ref
from optimum_atb.kernels.dispatch import has_kernel
from optimum_atb.kernels.triton.flash_attention import flash_attention_forward
from optimum_atb.kernels.triton.paged_attention import paged_attention_forward

ATOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}
OPS = ("flash_attention", "paged_attention", "reshape_and_cache", "rms_norm", "layer_norm")
OPS += ("apply_rotary", "swiglu", "geglu")


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    assert not actual.isnan().any(), "output has NaN (an element was not written)"
    torch.testing.assert_close(actual.double(), expected.double(), atol=ATOL[dtype] * scale, rtol=ATOL[dtype])


@pytest.fixture
def poisoned(monkeypatch):
    """Every float tensor allocated with torch.empty starts as NaN, so unwritten outputs show."""
    original = torch.empty

    def empty(*args, **kwargs):
        t = original(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


def strided(shape: tuple[int, ...], dtype: torch.dtype, perm: tuple[int, ...]) -> torch.Tensor:
    """A random tensor of `shape` whose memory is laid out in another order (non-contiguous view)."""
    base = torch.randn([shape[p] for p in perm], dtype=dtype)
    inverse = [perm.index(i) for i in range(len(shape))]
    t = base.permute(inverse)
    assert t.shape == shape
    return t


def test_every_op_has_a_triton_kernel():
    assert all(has_kernel(op, "triton") for op in OPS)


# ---------------------------------------------------------------------------------------- flash attention


@pytest.mark.parametrize(
    "sq,sk,hq,hkv,d,dtype,opts",
    [
        (37, 37, 4, 2, 64, torch.float32, dict(causal=True)),
        (5, 41, 4, 1, 80, torch.float32, dict(causal=True, sliding_window=9)),
        (40, 21, 2, 2, 96, torch.float16, dict(causal=True)),  # Sq > Sk: the first rows see no key
        (33, 50, 4, 2, 32, torch.bfloat16, dict(causal=False, sliding_window=7, softcap=5.0)),
    ],
)
def test_flash_ragged_tiles_and_padded_head_dim(poisoned, sq, sk, hq, hkv, d, dtype, opts):
    b = 2
    q = strided((b, sq, hq, d), dtype, (0, 2, 1, 3))  # [B,H,S,D] memory, as attention modules produce
    k = strided((b, sk, hkv, d), dtype, (0, 2, 1, 3))
    v = torch.randn(b, sk, hkv + 1, d, dtype=dtype)[:, :, 1:]  # a slice of a wider tensor
    slopes = torch.rand(b, hq)
    out, lse = flash_attention_forward(
        q, k, v, scale=d**-0.5, alibi_slopes=slopes, return_lse=True, block_m=16, block_n=16, **opts
    )
    want, want_lse = ref.flash_attention(q, k, v, scale=d**-0.5, alibi_slopes=slopes, return_lse=True, **opts)
    close(out, want, dtype)
    assert torch.equal(lse.isinf(), want_lse.isinf())
    finite = want_lse.isfinite()
    torch.testing.assert_close(lse[finite].double(), want_lse[finite], atol=1e-4, rtol=1e-4)


def test_flash_broadcast_bool_mask_with_fully_masked_rows(poisoned):
    b, s, hq, hkv, d = 2, 19, 4, 2, 64
    q, k, v = (torch.randn(b, s, h, d) for h in (hq, hkv, hkv))
    mask = torch.rand(b, 1, s, s) > 0.4  # broadcast over heads (stride 0)
    mask[1, :, 3] = False  # a row that sees nothing
    with use_backend("triton"):
        out, lse = ops.flash_attention(q, k, v, causal=True, attn_mask=mask, return_lse=True)
    want, want_lse = ref.flash_attention(q, k, v, causal=True, attn_mask=mask, return_lse=True)
    close(out, want, torch.float32)
    assert torch.all(out[1, 3] == 0) and torch.all(lse[1, :, 3] == float("-inf"))
    assert torch.equal(lse.isinf(), want_lse.isinf())


def test_flash_varlen_with_empty_sequences(poisoned):
    hq, hkv, d = 4, 2, 64
    cu_q = torch.tensor([0, 3, 3, 20, 22], dtype=torch.int32)  # second sequence has no query
    cu_k = torch.tensor([0, 10, 15, 34, 34], dtype=torch.int32)  # last sequence has no key
    q = torch.randn(22, hq, d)
    k, v = torch.randn(34, hkv, d), torch.randn(34, hkv, d)
    with use_backend("triton"):
        out, lse = ops.flash_attention(
            q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=17, max_seqlen_k=19, return_lse=True
        )
    want, want_lse = ref.flash_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    close(out, want, torch.float32)
    assert torch.all(out[20:] == 0) and torch.all(lse[:, 20:] == float("-inf"))
    assert torch.equal(lse.isinf(), want_lse.isinf())


def test_flash_backward_matches_reference_gradients():
    b, sq, sk, hq, hkv, d = 1, 6, 9, 4, 2, 32
    q, k, v = (torch.randn(b, s, h, d, requires_grad=True) for s, h in ((sq, hq), (sk, hkv), (sk, hkv)))
    grad = torch.randn(b, sq, hq, d)
    with use_backend("triton"):
        out = ops.flash_attention(q, k, v, causal=True, sliding_window=4)
    got = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want_out = ref.flash_attention(q64, k64, v64, causal=True, sliding_window=4)
    want = torch.autograd.grad(want_out, (q64, k64, v64), grad.double())
    close(out.detach(), want_out.detach(), torch.float32)
    for g, w in zip(got, want):
        close(g, w, torch.float32, scale=5.0)


def test_flash_dropout_is_refused():
    q = torch.randn(1, 4, 2, 16, requires_grad=True)
    with use_backend("triton"), pytest.raises(NotImplementedError, match="dropout"):
        ops.flash_attention(q, q, q, dropout_p=0.1)


# ---------------------------------------------------------------------------------------- paged attention


def _paged_inputs(contexts, sq, hq, hkv, d, block_size, dtype):
    b = len(contexts)
    max_blocks = -(-max(contexts) // block_size) + 1  # one spare column of table entries
    num_blocks = b * max_blocks + 3
    k_cache = torch.randn(num_blocks, block_size, hkv, d, dtype=dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, dtype=dtype)
    tables = torch.randperm(num_blocks)[: b * max_blocks].view(b, max_blocks).to(torch.int32)
    q = strided((b, sq, hq, d), dtype, (0, 2, 1, 3))
    return q, k_cache, v_cache, tables, torch.tensor(contexts, dtype=torch.int32)


@pytest.mark.parametrize(
    "contexts,sq,hq,hkv,d,block_size,dtype,opts",
    [
        ([5, 70, 100], 1, 4, 2, 64, 16, torch.float32, {}),
        ([40, 37, 99], 3, 4, 1, 80, 8, torch.float32, dict(sliding_window=20, softcap=3.0)),
        ([33, 64, 65], 2, 8, 2, 96, 32, torch.float16, {}),
        ([3, 50, 90], 1, 4, 2, 64, 16, torch.bfloat16, dict(sliding_window=45)),
    ],
)
def test_paged_split_k_over_several_partitions(poisoned, contexts, sq, hq, hkv, d, block_size, dtype, opts):
    q, k_cache, v_cache, tables, lens = _paged_inputs(contexts, sq, hq, hkv, d, block_size, dtype)
    slopes = torch.rand(len(contexts), hq)
    # partition 32 keys, tile 16: contexts up to 100 keys span 4 partitions, merged by the reduce kernel
    out = paged_attention_forward(
        q, k_cache, v_cache, tables, lens, scale=d**-0.5, alibi_slopes=slopes, partition_size=32,
        block_n=16, **opts,
    )  # fmt: skip
    want = ref.paged_attention(q, k_cache, v_cache, tables, lens, scale=d**-0.5, alibi_slopes=slopes, **opts)
    close(out, want, dtype)


def test_paged_single_partition_matches_split(poisoned):
    q, k_cache, v_cache, tables, lens = _paged_inputs([7, 30], 2, 4, 2, 64, 16, torch.float32)
    whole = paged_attention_forward(q, k_cache, v_cache, tables, lens, scale=0.125, partition_size=64)
    split = paged_attention_forward(q, k_cache, v_cache, tables, lens, scale=0.125, partition_size=16)
    want = ref.paged_attention(q, k_cache, v_cache, tables, lens, scale=0.125)
    close(whole, want, torch.float32)
    close(split, want, torch.float32)


def test_paged_public_op_large_blocks():
    q, k_cache, v_cache, tables, lens = _paged_inputs([129, 200], 1, 4, 4, 64, 128, torch.float32)
    with use_backend("triton"):
        out = ops.paged_attention(q, k_cache, v_cache, tables, lens)
    close(out, ref.paged_attention(q, k_cache, v_cache, tables, lens), torch.float32)


# ------------------------------------------------------------------------------------- cache, norms, rope


def test_reshape_and_cache_strided_inputs_and_skipped_slots():
    k = torch.randn(6, 3, 80)[:, 1:]  # [T, Hkv=2, D] slice of a wider tensor
    v = strided((6, 2, 80), torch.float32, (1, 0, 2))
    k_cache = torch.full((4, 8, 2, 80), float("nan"))
    v_cache = torch.full((4, 8, 2, 80), float("nan"))
    slots = torch.tensor([3, -1, 17, 31, -1, 8])
    want_k, want_v = ref.reshape_and_cache(k, v, k_cache, v_cache, slots)
    with use_backend("triton"):
        ops.reshape_and_cache(k, v, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache, want_k, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(v_cache, want_v, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_strided_rows_with_residual(poisoned, dtype):
    x = strided((3, 5, 96), dtype, (2, 0, 1))  # columns not unit-stride: copied once, correctly
    res = torch.randn(3, 5, 96, dtype=dtype)
    w, bias = torch.randn(96, dtype=dtype), torch.randn(96, dtype=dtype)
    with use_backend("triton"):
        rms, h = ops.rms_norm(x, w, 1e-6, residual=res, offset=1.0)
        ln, h2 = ops.layer_norm(x, w, bias, 1e-5, residual=res)
        plain = ops.layer_norm(x, None, None, 1e-5)
    assert torch.equal(h, x + res) and torch.equal(h2, x + res)  # rounded to nearest even, as torch adds
    # the reference sums in float64; the kernel normalises the (rounded) sum, so compare against that too
    close(rms, ref.rms_norm(h, w, 1e-6, offset=1.0), dtype, scale=4.0)
    close(ln, ref.layer_norm(h, w, bias, 1e-5), dtype, scale=8.0)
    close(plain, ref.layer_norm(x, None, None, 1e-5), dtype, scale=4.0)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_fused_qkv_views_partial_xpos(poisoned, interleaved):
    b, s, hq, hkv, d, r = 2, 7, 4, 2, 80, 48
    qkv = torch.randn(b, s, hq + 2 * hkv, d)  # a fused projection: q and k are strided views
    q, k = qkv[:, :, :hq], qkv[:, :, hq : hq + hkv]
    angles = torch.rand(1, s, r // 2) * 6
    layout = (lambda t: t.repeat_interleave(2, -1)) if interleaved else (lambda t: torch.cat((t, t), -1))
    cos, sin = layout(angles.cos()), layout(angles.sin())
    positions = torch.arange(s).expand(b, s) + torch.tensor([[0], [5]])
    opts = dict(interleaved=interleaved, rotary_dim=r, xpos_scale_base=64.0, positions=positions)
    with use_backend("triton"):
        q_rot, k_rot = ops.apply_rotary(q, k, cos, sin, **opts)
    want_q, want_k = ref.apply_rotary(q, k, cos, sin, **opts)
    close(q_rot, want_q, torch.float32)
    close(k_rot, want_k, torch.float32)


@pytest.mark.parametrize("form", ["separate", "concatenated"])
def test_glu_ragged_column_blocks(poisoned, form):
    n = 1500  # two column blocks of 1024, the second ragged
    fused = torch.randn(3, 2, 2 * n, dtype=torch.bfloat16)
    args = (fused,) if form == "concatenated" else (fused[..., :n], fused[..., n:])
    with use_backend("triton"):
        sw = ops.swiglu(*args)
        ge = ops.geglu(*args, approximate="none")
        ge_tanh = ops.geglu(*args, approximate="tanh")
    close(sw, ref.swiglu(*args), torch.bfloat16)
    close(ge, ref.geglu(*args, approximate="none"), torch.bfloat16)
    close(ge_tanh, ref.geglu(*args, approximate="tanh"), torch.bfloat16)
