"""The "atb" attention implementation against transformers' own eager attention."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask, sliding_window_causal_mask_function
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
from transformers.models.llama.modeling_llama import eager_attention_forward as llama_eager

import optimum_atb
from optimum_atb.attention import atb_attention_forward


class _Module(torch.nn.Module):
    def __init__(self, groups: int, causal: bool = True):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = causal
        self.head_dim = 8


def _qkv(b=2, hq=4, hkv=2, sq=5, sk=5, d=8, grad=False):
    q = torch.randn(b, hq, sq, d, requires_grad=grad)
    k = torch.randn(b, hkv, sk, d, requires_grad=grad)
    v = torch.randn(b, hkv, sk, d, requires_grad=grad)
    return q, k, v


def _additive(mask: torch.Tensor) -> torch.Tensor:
    return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)


def _causal(b, sq, sk, offset=0, padding=None, window=None):
    kwargs = {"mask_function": sliding_window_causal_mask_function(window)} if window else {}
    return sdpa_mask(
        batch_size=b, q_length=sq, kv_length=sk, q_offset=offset, attention_mask=padding,
        allow_is_causal_skip=False, **kwargs,
    )  # fmt: skip


def test_registered_at_class_level():
    assert AttentionInterface._global_mapping["atb"] is atb_attention_forward
    assert AttentionInterface()["atb"] is atb_attention_forward
    assert AttentionMaskInterface._global_mapping["atb"] is sdpa_mask


def test_mask_none_full_causal_matches_eager():
    m = _Module(2)
    q, k, v = _qkv()
    out, _ = atb_attention_forward(m, q, k, v, None, scaling=0.3)
    ref, _ = llama_eager(m, q, k, v, _additive(_causal(2, 5, 5)), scaling=0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_decode_one_query_sees_every_key():
    m = _Module(2)
    q, k, v = _qkv(sq=1, sk=7)
    out, _ = atb_attention_forward(m, q, k, v, None, scaling=0.3)
    ref, _ = llama_eager(m, q, k, v, None, scaling=0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_prefill_into_empty_static_cache_is_top_left_causal():
    """Mask None, K has max_cache_len rows (the tail unwritten: garbage here), Sq < Sk."""
    m = _Module(2)
    q, k, v = _qkv(sq=5, sk=16)
    out, _ = atb_attention_forward(m, q, k, v, None, scaling=0.3)
    ref, _ = llama_eager(m, q, k[:, :, :5], v[:, :, :5], _additive(_causal(2, 5, 5)), scaling=0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_left_padding_and_static_decode(mask_kind):
    """Left-padded rows, 3 queries at offset 4 over a 12-row static cache (unwritten tail masked)."""
    m = _Module(2)
    q, k, v = _qkv(sq=3, sk=12)
    padding = torch.ones(2, 12, dtype=torch.bool)
    padding[0, :3] = False
    mask = _causal(2, 3, 12, offset=4, padding=padding)
    given = mask if mask_kind == "bool" else _additive(mask)
    out, _ = atb_attention_forward(m, q, k, v, given, scaling=0.3)
    ref, _ = llama_eager(m, q, k, v, _additive(mask), scaling=0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_sliding_window_and_softcap_match_gemma2_eager():
    m = _Module(2)
    q, k, v = _qkv(sq=9, sk=9)
    q = q * 4  # scores large enough for the softcap to bite
    mask = _causal(2, 9, 9, window=4)
    out, _ = atb_attention_forward(m, q, k, v, mask, scaling=0.3, sliding_window=4, softcap=2.0)
    ref, _ = gemma2_eager(m, q, k, v, _additive(mask), scaling=0.3, softcap=2.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_is_causal_kwarg_and_module_flag():
    q, k, v = _qkv()
    out, _ = atb_attention_forward(_Module(2, causal=True), q, k, v, None, scaling=0.3, is_causal=False)
    ref, _ = llama_eager(_Module(2), q, k, v, None, scaling=0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out, _ = atb_attention_forward(_Module(2, causal=False), q, k, v, None, scaling=0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_gradients_match_eager():
    m = _Module(2)
    padding = torch.ones(2, 6, dtype=torch.bool)
    padding[1, :2] = False
    mask = _causal(2, 6, 6, padding=padding)
    inputs = _qkv(sq=6, sk=6, grad=True)
    out, _ = atb_attention_forward(m, *inputs, mask, scaling=0.3)
    (out[:, 2:] ** 2).sum().backward()  # rows 0-1 of batch 1 are padding: no key, no gradient path
    grads = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    ref, _ = llama_eager(m, *inputs, _additive(mask), scaling=0.3)
    (ref[:, 2:] ** 2).sum().backward()
    for g, t in zip(grads, inputs):
        torch.testing.assert_close(g, t.grad, atol=1e-5, rtol=1e-5)


def _tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip


def test_from_pretrained_and_set_attn_implementation(tmp_path):
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(_tiny_llama_config(), attn_implementation="eager").eval()
    stock.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="atb").eval()
    assert loaded.config._attn_implementation == "atb"
    ids = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        ref = stock(ids).logits
        torch.testing.assert_close(loaded(ids).logits, ref, atol=1e-4, rtol=0)
        stock.set_attn_implementation("atb")
        assert stock.config._attn_implementation == "atb"
        torch.testing.assert_close(stock(ids).logits, ref, atol=1e-4, rtol=0)


def test_import_changes_nothing_for_stock_models(tmp_path):
    """In a fresh process: a stock model's logits (sdpa and eager, padded batch) are bit-identical before
    and after `import optimum_atb`, and transformers' own interfaces keep their entries."""
    script = textwrap.dedent(
        """
        import torch
        from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig
        from transformers.masking_utils import AttentionMaskInterface
        cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
        torch.manual_seed(0)
        models = [AutoModelForCausalLM.from_config(cfg, attn_implementation=a).eval() for a in ("sdpa", "eager")]
        models[1].load_state_dict(models[0].state_dict())
        ids = torch.randint(1, 64, (2, 9))
        mask = torch.ones_like(ids); mask[0, :3] = 0
        def run():
            with torch.no_grad():
                return [m(input_ids=ids, attention_mask=mask).logits for m in models]
        attn, masks = dict(AttentionInterface._global_mapping), dict(AttentionMaskInterface._global_mapping)
        before = run()
        import optimum_atb
        after = run()
        assert all(torch.equal(a, b) for a, b in zip(before, after))
        assert all(AttentionInterface._global_mapping[k] is f for k, f in attn.items())
        assert all(AttentionMaskInterface._global_mapping[k] is f for k, f in masks.items())
        assert "atb" in AttentionInterface._global_mapping
        print("OK")
        """
    )
    # cwd: an empty folder, so that the checkout's top-level folders do not shadow installed packages
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-2000:]


def test_package_attaches_to_atb():
    from transformers import PreTrainedModel

    assert PreTrainedModel.to_atb is optimum_atb.to_atb
