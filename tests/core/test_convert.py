"""model.to_atb() / optimum_atb.revert(): conversion, checkpoints, generation modes, hooks."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import optimum_atb
from optimum_atb import BackendUnavailableError, QuantizationError, UnsupportedModelError, ops
from optimum_atb.convert import FUSIONS, stock_class


def _stock(**overrides):
    cfg = dict(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attention_bias=True, pad_token_id=0,
    )  # fmt: skip
    cfg.update(overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**cfg), attn_implementation="sdpa").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15)
    return model


IDS = torch.tensor([[5, 9, 17, 3, 44, 21, 8, 30, 12, 7]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _converted(model) -> dict[str, object]:
    """name -> the forward it runs now, for every module whose forward conversion replaced."""
    return {
        name: m.__dict__.get("forward", type(m).forward)
        for name, m in model.named_modules()
        if "forward" in m.__dict__ or stock_class(m) is not type(m)
    }


def test_to_atb_returns_model_and_matches_stock():
    stock = _stock()
    model = copy.deepcopy(stock)
    assert model.to_atb() is model
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.qkv_proj, torch.nn.Linear) and isinstance(
        model.model.layers[0].mlp.gate_up_proj, torch.nn.Linear
    )
    # the original projections view the fused weight: no memory duplicated
    assert attn.k_proj.weight.data_ptr() == attn.qkv_proj.weight[attn.q_proj.out_features :].data_ptr()
    torch.testing.assert_close(_logits(model), _logits(stock), atol=1e-4, rtol=0)
    assert _converted(stock) == {}  # other models untouched
    # converted modules keep their class names (a subclass carries the fused forward)
    assert {type(m).__name__ for m in model.modules()} == {type(m).__name__ for m in stock.modules()}
    assert isinstance(attn, type(stock.model.layers[0].self_attn)) and "LlamaAttention(" in repr(model)


def test_to_atb_twice_is_a_noop():
    model = _stock().to_atb()
    forwards = _converted(model)
    qkv = model.model.layers[0].self_attn.qkv_proj
    model.to_atb(fuse={"norm"})
    assert forwards and _converted(model) == forwards
    assert model.model.layers[0].self_attn.qkv_proj is qkv


def test_revert_is_bit_exact_and_reconvertible():
    model = _stock(attn_implementation=None)
    before = _logits(model)
    impl = model.config._attn_implementation
    optimum_atb.revert(model.to_atb())
    assert torch.equal(_logits(model), before)
    assert _converted(model) == {} and model.config._attn_implementation == impl
    assert type(model.model.layers[0]) is LlamaDecoderLayer
    attn = model.model.layers[0].self_attn
    assert not hasattr(attn, "qkv_proj") and not hasattr(attn, "_atb")
    ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(ptrs) == len(list(model.parameters()))  # plain parameters, no shared storage
    torch.testing.assert_close(_logits(model.to_atb()), before, atol=1e-4, rtol=0)


def test_state_dict_and_checkpoint_stay_stock(tmp_path):
    stock = _stock()
    model = copy.deepcopy(stock).to_atb()
    sd, ref = model.state_dict(), stock.state_dict()
    assert list(sd) == list(ref)
    assert all(sd[k].shape == ref[k].shape and torch.equal(sd[k], ref[k]) for k in ref)
    model.save_pretrained(tmp_path / "atb")
    stock.save_pretrained(tmp_path / "stock")
    saved, stock_saved = (load_file(tmp_path / d / "model.safetensors") for d in ("atb", "stock"))
    assert set(saved) == set(stock_saved)
    assert all(torch.equal(saved[k], stock_saved[k]) for k in stock_saved)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "atb", attn_implementation="sdpa").eval()
    assert torch.equal(_logits(reloaded), _logits(stock))


def test_load_state_dict_into_converted_model_updates_fused_weights():
    other = _stock()
    with torch.no_grad():
        for p in other.parameters():
            p.normal_(0, 0.15)
    model = _stock().to_atb()
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(_logits(model), _logits(other), atol=1e-4, rtol=0)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_each_fusion_alone_matches_stock(fusion):
    stock = _stock()
    model = copy.deepcopy(stock).to_atb(fuse={fusion})
    torch.testing.assert_close(_logits(model), _logits(stock), atol=1e-4, rtol=0)


def test_linear_fusion_binds_fp32_cpu_linears_only():
    stock = _stock()
    model = copy.deepcopy(stock).to_atb(fuse={"linear"})
    converted = _converted(model)
    bound = {name for name, m in model.named_modules() if type(m).__name__ == "Linear" and name in converted}
    plain = {name for name, m in model.named_modules() if type(m).__name__ == "Linear"}
    assert bound == plain and "lm_head" in bound  # every projection and the output projection
    assert _converted(copy.deepcopy(stock).to(torch.bfloat16).to_atb(fuse={"linear"})) == {}
    torch.testing.assert_close(_logits(model), _logits(stock), atol=1e-5, rtol=0)
    optimum_atb.revert(model)
    assert _converted(model) == {} and torch.equal(_logits(model), _logits(stock))


def test_fuse_false_changes_nothing():
    stock = _stock()
    model = copy.deepcopy(stock).to_atb(fuse=False)
    assert _converted(model) == {}
    assert torch.equal(_logits(model), _logits(stock))


def test_invalid_arguments_raise_before_any_change():
    model = _stock()
    with pytest.raises(ValueError, match="unknown fusion"):
        model.to_atb(fuse={"norm", "flash"})
    with pytest.raises(QuantizationError):
        model.to_atb(quantize="int3")
    with pytest.raises(BackendUnavailableError):
        model.to_atb(backend="npu")  # torch_npu is not installed here
    with pytest.raises(ValueError, match="unknown backend"):
        model.to_atb(backend="cuda")
    assert _converted(model) == {} and not hasattr(model.model.layers[0].self_attn, "qkv_proj")
    assert getattr(model, "_atb_state", None) is None


def test_unsupported_model_type_lists_supported():
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="llama.*qwen3|qwen3.*llama") as err:
        model.to_atb()
    assert "gpt2" in str(err.value)
    assert _converted(model) == {} and getattr(model, "_atb_state", None) is None


def test_pinned_backend_wins_over_ambient_choice():
    stock = _stock()
    model = copy.deepcopy(stock).to_atb(backend="torch")
    with optimum_atb.use_backend("npu"):  # unpinned ops would raise: no torch_npu here
        with pytest.raises(BackendUnavailableError):
            copy.deepcopy(stock).to_atb()(IDS)
        out = _logits(model)
    torch.testing.assert_close(out, _logits(stock), atol=1e-4, rtol=0)
    optimum_atb.revert(model)
    assert _converted(model) == {}


def test_sampling_and_beam_search_match_stock():
    stock = _stock()
    model = copy.deepcopy(stock).to_atb()
    for kwargs in (
        {"do_sample": True, "top_k": 20, "temperature": 0.8},
        {"num_beams": 3, "do_sample": False},
    ):
        outs = []
        for m in (stock, model):
            torch.manual_seed(7)
            with torch.no_grad():
                outs.append(m.generate(IDS, max_new_tokens=12, min_new_tokens=12, pad_token_id=0, **kwargs))
        assert torch.equal(*outs), kwargs


def test_device_map_cpu(tmp_path):
    stock = _stock()
    stock.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu").eval().to_atb()
    torch.testing.assert_close(_logits(model), _logits(stock), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_static_cache_with_torch_compile():
    stock = _stock()
    model = copy.deepcopy(stock).to_atb()
    model.forward = torch.compile(model.forward, dynamic=False)
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(IDS, cache_implementation="static", **kw)
        ref = stock.generate(IDS, **kw)
    assert torch.equal(out, ref)


def test_bf16_weights_convert():
    stock = _stock().to(torch.bfloat16)
    model = copy.deepcopy(stock).to_atb()
    assert model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    ref = _logits(_stock())
    assert (_logits(model).float() - ref).abs().max() <= 2 * (_logits(stock).float() - ref).abs().max() + 0.05


def test_quantize_hook_and_revert_refusal(monkeypatch):
    calls = []

    def fake_quantize(model, bits, group_size, include_lm_head):
        calls.append(
            (bits, group_size, include_lm_head, hasattr(model.model.layers[0].self_attn, "qkv_proj"))
        )

    monkeypatch.setattr(optimum_atb.quantization, "quantize", fake_quantize)
    model = _stock().to_atb(quantize="int4", group_size=32)
    assert calls == [(4, 32, None, False)]  # called once, before Q/K/V are concatenated
    with pytest.raises(QuantizationError, match="revert"):
        optimum_atb.revert(model)


def _assert_quantized_fusions(model, reference) -> None:
    """Q/K/V and gate/up of `model` are one QuantLinear each whose buffers the parts view; the buffers
    hold exactly `reference`'s (separately quantized) codes, scales and zeros."""
    from optimum_atb.patches.weights import QUANT_TENSORS
    from optimum_atb.quantization import QuantLinear

    for layer, ref_layer in zip(model.model.layers, reference.model.layers):
        for parent, ref_parent, fused_name, parts in (
            (layer.self_attn, ref_layer.self_attn, "qkv_proj", ("q_proj", "k_proj", "v_proj")),
            (layer.mlp, ref_layer.mlp, "gate_up_proj", ("gate_proj", "up_proj")),
        ):
            fused = getattr(parent, fused_name)
            assert type(fused) is QuantLinear
            for name in QUANT_TENSORS:
                expected = [getattr(getattr(ref_parent, p), name) for p in parts]
                if expected[0] is None:
                    continue
                assert torch.equal(getattr(fused, name), torch.cat(expected))
                offset = 0
                for p in parts:
                    part = getattr(getattr(parent, p), name)
                    assert part.data_ptr() == getattr(fused, name)[offset:].data_ptr()  # a view, no copy
                    offset += part.shape[0]


@pytest.mark.parametrize("method,bits", [("int8", 8), ("int4", 4)])
def test_to_atb_quantize_matches_quantized_stock(method, bits):
    """Every linear quantized exactly once, Q/K/V and gate/up then concatenated as quantized layers whose
    buffers the parts view (no second copy); same math as quantizing the stock model."""
    from optimum_atb.quantization import QuantLinear

    reference = optimum_atb.quantize(_stock(), bits=bits, group_size=32 if bits == 4 else None)
    model = _stock().to_atb(quantize=method, group_size=32 if bits == 4 else None)
    _assert_quantized_fusions(model, reference)
    assert not any(type(m) is torch.nn.Linear for n, m in model.named_modules() if ".layers." in n)
    assert all(isinstance(m, QuantLinear) for n, m in model.named_modules() if n.endswith("proj"))
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=0, atol=2e-3)
    # the checkpoint format is the stock quantized one: no fused keys, the parts' own tensors
    state, ref_state = model.state_dict(), reference.state_dict()
    assert state.keys() == ref_state.keys()
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)
    assert all(state[k].untyped_storage().nbytes() == state[k].nbytes for k in state if "layers.0." in k)


def test_to_atb_of_an_already_quantized_model_fuses_and_reverts():
    """A model loaded quantized (load_gguf, AtbQuantConfig) concatenates its quantized Q/K/V and gate/up;
    loading a state dict writes through to the fused layers; revert gives the parts their own buffers."""
    reference = optimum_atb.quantize(_stock(), bits=4, group_size=32)
    model = optimum_atb.quantize(_stock(), bits=4, group_size=32).to_atb()
    _assert_quantized_fusions(model, reference)
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=0, atol=2e-3)
    perturbed = _stock()
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other = optimum_atb.quantize(perturbed, bits=4, group_size=32)
    model.load_state_dict(other.state_dict())
    _assert_quantized_fusions(model, other)
    torch.testing.assert_close(_logits(model), _logits(other), rtol=0, atol=2e-3)
    optimum_atb.revert(model)
    attn = model.model.layers[0].self_attn
    assert not hasattr(attn, "qkv_proj") and not hasattr(model.model.layers[0].mlp, "gate_up_proj")
    assert attn.k_proj.weight.untyped_storage().nbytes() == attn.k_proj.weight.nbytes
    torch.testing.assert_close(_logits(model), _logits(other), rtol=0, atol=2e-3)
    quantized = optimum_atb.quantize(_stock(), bits=8)
    with pytest.raises(QuantizationError, match="already quantized"):
        quantized.to_atb(quantize="int8")
    assert getattr(quantized, "_atb_state", None) is None  # refused before anything changed


def test_speculative_hooks(monkeypatch):
    seen = []
    monkeypatch.setattr(optimum_atb.speculative, "attach", lambda m: seen.append(("attach", m)))
    monkeypatch.setattr(optimum_atb.speculative, "detach", lambda m: seen.append(("detach", m)))
    model = _stock().to_atb()
    optimum_atb.revert(model)
    assert seen == [("attach", model), ("detach", model)]


class _PagedCache:
    """Stands in for the paged cache: records the call, refuses `update`."""

    is_atb_paged = True

    def __init__(self):
        self.calls = []

    def update(self, *args, **kwargs):
        raise AssertionError("a paged cache must not be updated by the attention module")

    def paged_attention_forward(self, **kwargs):
        self.calls.append(kwargs)
        return torch.ones_like(kwargs["query"])


def test_paged_cache_owns_the_attention():
    model = _stock(sliding_window=None).to_atb()
    attn = model.model.layers[1].self_attn
    x = torch.randn(2, 3, 64)
    pos = torch.arange(3)[None]
    cos, sin = model.model.rotary_emb(x, pos)
    cache = _PagedCache()
    with torch.no_grad():
        out, _ = attn(x, position_embeddings=(cos, sin), attention_mask=None, cache=cache)
        q, k, v = attn.qkv_proj(x).split([64, 32, 32], dim=-1)
        q, k = ops.apply_rotary(q.view(2, 3, 4, 16), k.view(2, 3, 2, 16), cos, sin)
        expected_out = attn.o_proj(torch.ones(2, 3, 64))
    (call,) = cache.calls
    assert call["layer_idx"] == 1 and call["scaling"] == attn.scaling
    assert call["sliding_window"] is None and call["softcap"] is None and call["attention_mask"] is None
    torch.testing.assert_close(call["query"], q)
    torch.testing.assert_close(call["key"], k)
    torch.testing.assert_close(call["value"], v.view(2, 3, 2, 16))
    torch.testing.assert_close(out, expected_out)


def test_a_module_with_its_own_instance_forward_gets_the_fused_one_bound_and_back_on_revert():
    """An instance forward set by someone else (accelerate's hooks do this) keeps priority over a class
    forward, so conversion binds the fused forward on that instance and revert puts the original back."""
    stock = _stock()
    model = copy.deepcopy(stock)
    attn = model.model.layers[0].self_attn
    calls = []
    stock_forward = attn.forward

    def hooked(*args, **kwargs):
        calls.append(1)
        return stock_forward(*args, **kwargs)

    attn.forward = hooked
    model.to_atb()
    assert type(attn) is stock_class(attn) and attn.forward.__func__.__name__ == "attention_forward"
    torch.testing.assert_close(_logits(model), _logits(stock), atol=1e-4, rtol=0)
    assert calls == []  # the fused forward replaced the hook while converted
    optimum_atb.revert(model)
    assert attn.__dict__["forward"] is hooked
    torch.testing.assert_close(_logits(model), _logits(stock), atol=1e-5, rtol=0)
    assert calls == [1]
