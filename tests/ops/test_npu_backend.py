"""NPU-specific checks of the npu backend, run through the emulator of the documented torch_npu semantics
(tests/npu_emulator.py; no Ascend device ran any of this). Results are compared with the float64
reference, and the recorded torch_npu calls are checked for the documented arguments."""

from __future__ import annotations

import warnings

import pytest
import torch
from npu_emulator import installed, npu_fused_infer_attention_score, npu_weight_quant_batchmatmul

import optimum_atb
from optimum_atb import backends, ops
from optimum_atb.kernels import reference as R
from optimum_atb.kernels.dispatch import get_kernel

TRIU_2048 = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


@pytest.fixture
def npu():
    """The emulated torch_npu, with every op of the block on the npu backend and fresh fallback warnings."""
    for key in [k for k in backends._warned if k.startswith("npu-")]:
        backends._warned.discard(key)
    with installed() as module, optimum_atb.use_backend("npu"):
        yield module


def last_call(npu, name: str) -> dict:
    calls = [args for op, args in npu.calls if op == name]
    assert calls, f"{name} was not called; calls: {[op for op, _ in npu.calls]}"
    return calls[-1]


def close(actual, expected, atol=2e-5):
    torch.testing.assert_close(actual.to(torch.float64), expected, atol=atol, rtol=1e-4)


def qkv(b=2, sq=5, sk=7, hq=4, hkv=2, d=16, dtype=torch.float32):
    return (
        torch.randn(b, sq, hq, d, dtype=dtype),
        torch.randn(b, sk, hkv, d, dtype=dtype),
        torch.randn(b, sk, hkv, d, dtype=dtype),
    )


def f64(*ts):
    return [t.to(torch.float64) for t in ts]


# ------------------------------------------------------------------------------------- flash_attention


@pytest.mark.parametrize(
    "opts, mode, pre, nxt",
    [
        (dict(causal=True), 3, None, None),
        (dict(causal=False), 0, None, None),
        (dict(causal=True, sliding_window=3), 4, 3, 0),
        (dict(causal=False, sliding_window=2), 4, 2, 2147483647),
        (dict(causal=True, alibi_slopes="alibi"), 3, None, None),
    ],
)
def test_flash_attention_fia_arguments_and_values(npu, opts, mode, pre, nxt):
    q, k, v = qkv()
    if opts.get("alibi_slopes") == "alibi":
        opts = dict(opts, alibi_slopes=ops.alibi_slopes(4))
    out, lse = ops.flash_attention(q, k, v, scale=0.3, return_lse=True, **opts)
    ref_out, ref_lse = R.flash_attention(*f64(q, k, v), scale=0.3, return_lse=True, **opts)
    close(out, ref_out)
    close(lse, ref_lse)
    call = last_call(npu, "npu_fused_infer_attention_score")
    assert call["scale"] == 0.3 and call["input_layout"] == "BSND"
    assert (call["num_heads"], call["num_key_value_heads"]) == (4, 2)
    assert call["sparse_mode"] == mode and call["softmax_lse_flag"] is True
    if mode in (3, 4):
        assert torch.equal(call["atten_mask"], TRIU_2048)
    else:
        assert call["atten_mask"] is None
    if pre is not None:
        assert (call["pre_tokens"], call["next_tokens"]) == (pre, nxt)
    assert (call["pse_shift"] is not None) == ("alibi_slopes" in opts)


def test_causal_mask_is_cached_per_device(npu):
    q, k, v = qkv()
    ops.flash_attention(q, k, v)
    ops.flash_attention(q, k, v)
    masks = [args["atten_mask"] for op, args in npu.calls if op == "npu_fused_infer_attention_score"]
    assert masks[0] is masks[1]


def test_dropping_causal_would_be_caught():
    """The emulator really applies what sparse_mode says: FIA without the causal mode is not causal attention."""
    q, k, v = qkv(sq=6, sk=6)
    with installed():
        wrong, _ = npu_fused_infer_attention_score(
            q, k, v, num_heads=4, num_key_value_heads=2, scale=0.25, input_layout="BSND"
        )
    ref = R.flash_attention(*f64(q, k, v), causal=True, scale=0.25)
    assert not torch.allclose(wrong.double(), ref, atol=1e-3)


def test_attn_mask_inverted_and_broadcast_over_queries(npu):
    q, k, v = qkv(sq=3, sk=6)
    keep = torch.tensor([[1, 1, 1, 0, 1, 1], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    mask = keep[:, None, None, :]  # [B, 1, 1, Sk]: key padding, True = attend
    out = ops.flash_attention(q, k, v, causal=False, attn_mask=mask)
    close(out, R.flash_attention(*f64(q, k, v), causal=False, attn_mask=mask))
    call = last_call(npu, "npu_fused_infer_attention_score")
    assert call["sparse_mode"] == 0
    assert tuple(call["atten_mask"].shape) == (2, 1, 3, 6)  # the NPU never broadcasts over Q_S
    assert torch.equal(call["atten_mask"], ~mask.expand(2, 1, 3, 6))  # 1 = masked


def test_attn_mask_with_causal_folds_both(npu):
    q, k, v = qkv(sq=4, sk=4)
    mask = torch.rand(2, 1, 4, 4) > 0.3
    out = ops.flash_attention(q, k, v, causal=True, sliding_window=2, attn_mask=mask)
    close(out, R.flash_attention(*f64(q, k, v), causal=True, sliding_window=2, attn_mask=mask))
    assert last_call(npu, "npu_fused_infer_attention_score")["sparse_mode"] == 0


def test_fully_masked_rows_use_inner_precise_2(npu):
    q, k, v = qkv(sq=2, sk=3)
    mask = torch.tensor([[True, True, False], [False, False, False]]).view(1, 1, 2, 3)
    out, lse = ops.flash_attention(q, k, v, causal=False, attn_mask=mask, return_lse=True)
    ref_out, ref_lse = R.flash_attention(*f64(q, k, v), causal=False, attn_mask=mask, return_lse=True)
    close(out, ref_out)
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
    assert torch.isneginf(lse[:, :, 1]).all() and torch.isneginf(ref_lse[:, :, 1]).all()
    close(lse[:, :, 0], ref_lse[:, :, 0])
    assert last_call(npu, "npu_fused_infer_attention_score")["inner_precise"] == 2
    # Without it the emulated operator loses the row (NaN), as the documentation warns.
    bad, _ = npu_fused_infer_attention_score(
        q, k, v, atten_mask=~mask, num_heads=4, num_key_value_heads=2, scale=0.25, input_layout="BSND"
    )
    assert torch.isnan(bad[:, 1]).all()


def test_causal_more_queries_than_keys(npu):
    q, k, v = qkv(sq=6, sk=4)
    out, lse = ops.flash_attention(q, k, v, causal=True, return_lse=True)
    ref_out, ref_lse = R.flash_attention(*f64(q, k, v), causal=True, return_lse=True)
    close(out, ref_out)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert last_call(npu, "npu_fused_infer_attention_score")["inner_precise"] == 2


def test_scale_must_be_explicit():
    q, k, v = qkv()
    with installed(), pytest.raises(RuntimeError, match="scale defaults to 1.0"):
        npu_fused_infer_attention_score(q, k, v, num_heads=4, num_key_value_heads=2, input_layout="BSND")


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_uses_tnd_with_cumulative_lengths(npu, causal):
    cu_q = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 7, 12], dtype=torch.int32)
    q, k, v = torch.randn(9, 4, 16), torch.randn(12, 2, 16), torch.randn(12, 2, 16)
    out, lse = ops.flash_attention(
        q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=5, max_seqlen_k=5,
        return_lse=True,
    )  # fmt: skip
    ref_out, ref_lse = R.flash_attention(
        *f64(q, k, v), causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True
    )
    close(out, ref_out)
    close(lse, ref_lse)
    call = last_call(npu, "npu_fused_infer_attention_score")
    assert call["input_layout"] == "TND"
    assert call["actual_seq_lengths"] == [3, 4, 9] and call["actual_seq_lengths_kv"] == [5, 7, 12]
    assert call["sparse_mode"] == (3 if causal else 0)


@pytest.mark.parametrize(
    "opts", [dict(causal=True), dict(causal=True, sliding_window=3), dict(causal=False, alibi_slopes="alibi")]
)
def test_gradients_use_the_training_operator(npu, opts):
    if opts.get("alibi_slopes") == "alibi":
        opts = dict(opts, alibi_slopes=ops.alibi_slopes(4))
    q, k, v = (t.requires_grad_() for t in qkv(sq=6, sk=6))
    out, lse = ops.flash_attention(q, k, v, scale=0.2, return_lse=True, **opts)
    (out.square().sum() + lse.sum()).backward()
    call = last_call(npu, "npu_fusion_attention")
    assert call["scale"] == 0.2 and call["head_num"] == 4 and call["input_layout"] == "BSND"
    assert not any(op == "npu_fused_infer_attention_score" for op, _ in npu.calls)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = R.flash_attention(q64, k64, v64, scale=0.2, return_lse=True, **opts)
    (ref_out.square().sum() + ref_lse.sum()).backward()
    close(out.detach(), ref_out.detach())
    close(lse.detach(), ref_lse.detach())
    for got, want in ((q, q64), (k, k64), (v, v64)):
        close(got.grad, want.grad, atol=1e-4)


def test_varlen_gradients_use_tnd_training_operator(npu):
    cu_q = torch.tensor([0, 3, 7], dtype=torch.int32)
    q, k, v = (torch.randn(7, h, 16).requires_grad_() for h in (4, 2, 2))
    out, lse = ops.flash_attention(
        q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_q, max_seqlen_q=4, max_seqlen_k=4, return_lse=True
    )
    (out.square().sum() + lse.sum()).backward()
    call = last_call(npu, "npu_fusion_attention")
    assert call["input_layout"] == "TND" and call["actual_seq_qlen"] == [3, 7] and call["sparse_mode"] == 3
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = R.flash_attention(q64, k64, v64, cu_seqlens_q=cu_q, cu_seqlens_k=cu_q, return_lse=True)
    (ref_out.square().sum() + ref_lse.sum()).backward()
    close(lse.detach(), ref_lse.detach())
    for got, want in ((q, q64), (k, k64), (v, v64)):
        close(got.grad, want.grad, atol=1e-4)


def test_dropout_goes_through_keep_prob(npu):
    q, k, v = (t.requires_grad_() for t in qkv())
    out = ops.flash_attention(q, k, v, dropout_p=0.25)
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert last_call(npu, "npu_fusion_attention")["keep_prob"] == 0.75


def test_softcap_falls_back_with_one_warning(npu):
    q, k, v = qkv()
    with pytest.warns(UserWarning, match="softcap"):
        out = ops.flash_attention(q, k, v, softcap=5.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.flash_attention(q, k, v, softcap=5.0)
    close(out, R.flash_attention(*f64(q, k, v), softcap=5.0))
    assert not npu.calls


@pytest.mark.parametrize("shape", [(2, 4, 5, 7), (4, 5, 7)])
def test_per_head_mask_falls_back_with_warning(npu, shape):
    q, k, v = qkv()
    mask = torch.rand(shape) > 0.3
    with pytest.warns(UserWarning, match="per-head"):
        out = ops.flash_attention(q, k, v, causal=False, attn_mask=mask)
    close(out, R.flash_attention(*f64(q, k, v), causal=False, attn_mask=mask))


def test_bf16_within_atb_tolerance(npu):
    q, k, v = qkv(sq=8, sk=8, d=32, dtype=torch.bfloat16)
    out = ops.flash_attention(q, k, v)
    ref = R.flash_attention(*f64(q, k, v))
    assert out.dtype == torch.bfloat16
    assert ((out.double() - ref).abs() <= ref.abs().clamp(min=1) * 2**-7).all()


# ---------------------------------------------------------------------------------------------- paged


def paged_setup(block_size, sq, lens=(5, 19), hq=4, hkv=2, d=16, blocks=8):
    k_cache, v_cache = torch.randn(blocks, block_size, hkv, d), torch.randn(blocks, block_size, hkv, d)
    table = torch.tensor([[3, 1, -1], [0, 6, 2]], dtype=torch.int32)[:, : -(-max(lens) // block_size)]
    q = torch.randn(len(lens), sq, hq, d)
    return q, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32)


def test_paged_decode_uses_atb_paged_attention_with_host_lengths(npu):
    q, kc, vc, table, lens = paged_setup(block_size=16, sq=1)
    out = ops.paged_attention(q, kc, vc, table, lens, scale=0.3)
    close(out, R.paged_attention(*f64(q, kc, vc), table, lens, scale=0.3))
    call = last_call(npu, "_npu_paged_attention")
    assert call["context_lens"].device.type == "cpu" and call["context_lens"].dtype == torch.int32
    assert call["block_table"].dtype == torch.int32 and call["scale_value"] == 0.3
    assert (call["num_heads"], call["num_kv_heads"]) == (4, 2)
    # On this CPU-only machine the host/device move cannot be observed; the dtype conversion can.
    kernel = get_kernel("paged_attention", "npu")
    out64 = kernel(
        q=q, k_cache=kc, v_cache=vc, block_tables=table.long(), context_lens=lens.long(), scale=0.3,
        sliding_window=None, alibi_slopes=None, softcap=None,
    )  # fmt: skip
    assert last_call(npu, "_npu_paged_attention")["context_lens"].dtype == torch.int32
    torch.testing.assert_close(out64, out)


def test_paged_verification_uses_fia_with_block_table(npu):
    q, kc, vc, table, lens = paged_setup(block_size=128, sq=3, lens=(5, 130), blocks=4)
    table = torch.tensor([[2, 0], [3, 1]], dtype=torch.int32)
    out = ops.paged_attention(q, kc, vc, table, lens)
    close(out, R.paged_attention(*f64(q, kc, vc), table, lens))
    call = last_call(npu, "npu_fused_infer_attention_score")
    assert call["block_size"] == 128 and call["branch"] == "prompt" and call["sparse_mode"] == 3
    assert call["actual_seq_lengths_kv"] == [5, 130] and call["block_table"].dtype == torch.int32


def test_paged_sliding_window_decode_uses_fia_band(npu):
    q, kc, vc, table, lens = paged_setup(block_size=16, sq=1)
    out = ops.paged_attention(q, kc, vc, table, lens, sliding_window=4)
    close(out, R.paged_attention(*f64(q, kc, vc), table, lens, sliding_window=4))
    call = last_call(npu, "npu_fused_infer_attention_score")
    assert (call["sparse_mode"], call["pre_tokens"], call["next_tokens"], call["branch"]) == (
        4,
        4,
        0,
        "incre",
    )


def test_paged_block_size_outside_npu_constraints_falls_back_with_one_warning(npu):
    q, kc, vc, table, lens = paged_setup(block_size=16, sq=2)
    with pytest.warns(UserWarning, match="multiple of 128"):
        out = ops.paged_attention(q, kc, vc, table, lens)
    assert not npu.calls
    close(out, R.paged_attention(*f64(q, kc, vc), table, lens))


def test_paged_alibi_falls_back_with_one_warning(npu):
    q, kc, vc, table, lens = paged_setup(block_size=16, sq=1)
    slopes = ops.alibi_slopes(4)
    with pytest.warns(UserWarning, match="ALiBi"):
        out = ops.paged_attention(q, kc, vc, table, lens, alibi_slopes=slopes)
    close(out, R.paged_attention(*f64(q, kc, vc), table, lens, alibi_slopes=slopes))


def test_reshape_and_cache_filters_padding_slots(npu):
    k, v = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    kc, vc = torch.zeros(3, 16, 2, 8), torch.zeros(3, 16, 2, 8)
    slots = torch.tensor([5, -1, 40, -1])
    ref_k, ref_v = R.reshape_and_cache(k, v, kc, vc, slots)
    ops.reshape_and_cache(k, v, kc, vc, slots)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)
    call = last_call(npu, "_npu_reshape_and_cache")
    assert call["slot_indices"].tolist() == [5, 40] and call["slot_indices"].dtype == torch.int32


def test_emulated_reshape_and_cache_rejects_negative_slots(npu):
    with pytest.raises(RuntimeError, match="slot out of range"):
        npu._npu_reshape_and_cache(
            torch.randn(2, 1, 4), torch.randn(2, 1, 4), torch.zeros(1, 16, 1, 4), torch.zeros(1, 16, 1, 4),
            torch.tensor([0, -1], dtype=torch.int32),
        )  # fmt: skip


# ------------------------------------------------------------------------------- norms, rotary, activations


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_and_residual(npu, offset):
    x, res, w = torch.randn(3, 5, 32), torch.randn(3, 5, 32), torch.randn(32)
    close(ops.rms_norm(x, w, 1e-6, offset=offset), R.rms_norm(x, w, 1e-6, offset=offset))
    assert last_call(npu, "npu_rms_norm")["epsilon"] == 1e-6
    out, h = ops.rms_norm(x, w, 1e-5, residual=res, offset=offset)
    ref_out, ref_h = R.rms_norm(x, w, 1e-5, residual=res, offset=offset)
    close(out, ref_out)
    close(h, ref_h)
    assert last_call(npu, "npu_add_rms_norm")["epsilon"] == 1e-5


@pytest.mark.parametrize("interleaved, rotary_dim", [(False, 16), (True, 16), (False, 8)])
def test_apply_rotary_uses_rotary_mul(npu, interleaved, rotary_dim):
    q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16)
    angles = torch.randn(1, 5, rotary_dim // 2)
    angles = angles.repeat_interleave(2, -1) if interleaved else torch.cat((angles, angles), -1)
    cos, sin = angles.cos(), angles.sin()
    got = ops.apply_rotary(q, k, cos, sin, interleaved=interleaved, rotary_dim=rotary_dim)
    want = R.apply_rotary(q, k, cos, sin, interleaved=interleaved, rotary_dim=rotary_dim)
    close(got[0], want[0])
    close(got[1], want[1])
    call = last_call(npu, "npu_rotary_mul")
    assert call["rotary_mode"] == ("interleave" if interleaved else "half") and call["self"].dim() == 4


def test_apply_rotary_xpos_falls_back_with_warning(npu):
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    angles = torch.randn(1, 4, 4).repeat(1, 1, 2)
    pos = torch.arange(4).view(1, 4)
    with pytest.warns(UserWarning, match="xPos"):
        got = ops.apply_rotary(q, k, angles.cos(), angles.sin(), xpos_scale_base=512.0, positions=pos)
    want = R.apply_rotary(q, k, angles.cos(), angles.sin(), xpos_scale_base=512.0, positions=pos)
    close(got[0], want[0])
    assert not npu.calls


@pytest.mark.parametrize("split", [False, True])
def test_swiglu_and_geglu(npu, split):
    gate, up = torch.randn(3, 10), torch.randn(3, 10)
    args = (torch.cat((gate, up), -1), None) if split else (gate, up)
    close(ops.swiglu(*args), R.swiglu(*args))
    assert last_call(npu, "npu_swiglu")["self"].shape[-1] == 20
    for approximate, code in (("tanh", 1), ("none", 0)):
        close(ops.geglu(*args, approximate=approximate), R.geglu(*args, approximate=approximate))
        call = last_call(npu, "npu_geglu")
        assert call["approximate"] == code and call["activate_left"] is True


def test_layer_norm_is_native_without_warning(npu):
    x, w, b = torch.randn(2, 3, 16), torch.randn(16), torch.randn(16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ops.layer_norm(x, w, b, 1e-5)
    close(out, R.layer_norm(x, w, b, 1e-5))


# ------------------------------------------------------------------------- emulator: quantized matmul, install


def test_weight_quant_batchmatmul_int8_per_channel():
    x = torch.randn(4, 64, dtype=torch.float16)
    w = torch.randint(-128, 128, (64, 24), dtype=torch.int8)
    scale, offset = torch.rand(24, dtype=torch.float16) / 50, torch.randn(24).round().half()
    got = npu_weight_quant_batchmatmul(x, w, scale, offset)
    want = x.double() @ ((w.double() + offset.double()) * scale.double())
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-3)


def test_weight_quant_batchmatmul_int4_per_group(npu):
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    w = torch.randint(-8, 8, (64, 16), dtype=torch.int32)
    scale = torch.rand(2, 16).bfloat16() / 10
    packed = npu.npu_convert_weight_to_int4pack(w)
    assert packed.shape == (64, 2) and packed.dtype == torch.int32
    got = npu.npu_weight_quant_batchmatmul(x, packed, scale, antiquant_group_size=32)
    want = x.double() @ (w.double() * scale.double().repeat_interleave(32, 0))
    torch.testing.assert_close(got.double(), want, atol=3e-2, rtol=1e-2)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        npu.npu_weight_quant_batchmatmul(x, packed, scale, antiquant_group_size=16)


def test_installed_is_scoped():
    import sys

    with installed():
        assert "torch_npu" in sys.modules
        assert backends.backend_info()["npu"]["available"]
    assert sys.modules.get("torch_npu") is None


# ---------------------------------------------------------------------------------------- whole model


def test_tiny_llama_generation_on_npu_backend_matches_stock(npu):
    """A converted tiny LLaMA generating through the paged cache on the (emulated) npu backend: same tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (2, 9))
    opts = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        expected = model.generate(ids, **opts)  # stock transformers, before conversion
    model.to_atb()
    with torch.no_grad():
        got = model.generate(ids, cache=optimum_atb.PagedCache(config, block_size=128), **opts)
    assert torch.equal(got, expected)
    used = {op for op, _ in npu.calls}
    assert {"_npu_paged_attention", "_npu_reshape_and_cache", "npu_fused_infer_attention_score"} <= used
    assert {"npu_rms_norm", "npu_add_rms_norm", "npu_rotary_mul", "npu_swiglu"} <= used
