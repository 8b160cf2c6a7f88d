"""quantize(), AtbQuantConfig through from_pretrained/save_pretrained, and the errors, on a tiny random Llama."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from quantized_reference import rounded_reference
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import optimum_atb
from optimum_atb import AtbQuantConfig, QuantizationError
from optimum_atb.quantization import QuantLinear

CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
)  # fmt: skip


def _tiny() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def saved_float(tmp_path):
    model = _tiny()
    model.save_pretrained(tmp_path / "float")
    return model, tmp_path / "float"


@pytest.mark.parametrize("bits,group", [(8, None), (8, 32), (4, 32), (4, 64)])
def test_quantize_replaces_decoder_linears_and_lm_head_in_int8(bits, group):
    model = _tiny()
    ids = torch.randint(0, 128, (2, 12))
    ref = _logits(model, ids)
    optimum_atb.quantize(model, bits=bits, group_size=group)
    layer = model.model.layers[0]
    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.down_proj):
        assert isinstance(proj, QuantLinear) and (proj.bits, proj.group_size) == (bits, group)
    assert isinstance(model.lm_head, QuantLinear) and (model.lm_head.bits, model.lm_head.group_size) == (
        8,
        None,
    )
    assert model.config.quantization_config.bits == bits
    assert model.config.quantization_config.include_lm_head
    out = _logits(model, ids)
    assert (out - ref).abs().max() < (0.05 if bits == 8 else 0.25) * ref.abs().max()


def test_quantize_frees_each_float_layer_before_quantizing_the_next(monkeypatch):
    """In-place quantization must not hold every float weight until the end (the peak memory of
    quantizing a loaded model would be the float model plus the quantized one)."""
    model = _tiny()
    originals = [weakref.ref(m) for m in model.model.modules() if type(m) is torch.nn.Linear]  # decoder's
    alive_at_each_step = []
    from_linear = QuantLinear.from_linear.__func__

    def counting_from_linear(cls, linear, bits, group_size):
        alive_at_each_step.append(sum(ref() is not None for ref in originals))
        return from_linear(cls, linear, bits, group_size)

    monkeypatch.setattr(QuantLinear, "from_linear", classmethod(counting_from_linear))
    optimum_atb.quantize(model, bits=8)
    n = len(originals)
    assert alive_at_each_step[:n] == list(range(n, 0, -1))  # one fewer float layer alive at each step


@pytest.mark.parametrize("bits", [8, 4])
def test_lm_head_left_in_float_on_request(bits):
    model = optimum_atb.quantize(_tiny(), bits=bits, include_lm_head=False)
    assert type(model.lm_head) is torch.nn.Linear


def test_int4_with_int8_head_roundtrips_through_load_time_quantization(saved_float, tmp_path):
    model, path = saved_float
    ids = torch.randint(0, 128, (2, 10))
    expected = _logits(optimum_atb.quantize(model, bits=4, group_size=32), ids)
    config = AtbQuantConfig(bits=4, group_size=32, include_lm_head=True)
    loaded = AutoModelForCausalLM.from_pretrained(path, quantization_config=config).eval()
    assert (loaded.lm_head.bits, loaded.model.layers[0].mlp.up_proj.bits) == (8, 4)
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=0, atol=0)
    loaded.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    torch.testing.assert_close(_logits(reloaded, ids), expected, rtol=0, atol=0)


def test_quantized_tied_head_is_untied_and_roundtrips(tmp_path):
    model = LlamaForCausalLM(LlamaConfig(**CONFIG, tie_word_embeddings=True)).eval()
    embed = model.model.embed_tokens.weight.detach().clone()
    optimum_atb.quantize(model, bits=8)
    assert isinstance(model.lm_head, QuantLinear) and not model.config.tie_word_embeddings
    assert torch.equal(model.model.embed_tokens.weight, embed)  # input embeddings stay in float
    ids = torch.randint(0, 128, (2, 9))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded.lm_head, QuantLinear)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), rtol=0, atol=0)


def test_load_time_head_quantization_of_a_tied_model_raises(tmp_path):
    LlamaForCausalLM(LlamaConfig(**CONFIG, tie_word_embeddings=True)).save_pretrained(tmp_path)
    with pytest.raises(QuantizationError, match="ties it to the input embeddings"):
        AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=AtbQuantConfig(8, include_lm_head=True)
        )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=3), "bits=3"),
        (dict(bits=4, group_size=48), "group_size=48"),
        (dict(bits=8, group_size=48), "group_size=48"),
        (dict(bits=8, group_size=128), "does not divide in_features=64"),
        (dict(bits=4, group_size=128), "does not divide in_features=64"),
    ],
)
def test_invalid_requests_raise_before_changing_the_model(kwargs, match):
    model = _tiny()
    with pytest.raises(QuantizationError, match=match):
        optimum_atb.quantize(model, **kwargs)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_quantizing_twice_raises():
    model = optimum_atb.quantize(_tiny(), bits=8)
    with pytest.raises(QuantizationError, match="already quantized"):
        optimum_atb.quantize(model, bits=4)


def test_config_rejects_bad_bits():
    with pytest.raises(QuantizationError):
        AtbQuantConfig(bits=2)


@pytest.mark.parametrize("bits,group", [(8, None), (8, 32), (4, None)])
def test_from_pretrained_quantizes_at_load_like_quantize(saved_float, bits, group, tmp_path):
    model, path = saved_float
    ids = torch.randint(0, 128, (2, 10))
    expected = _logits(optimum_atb.quantize(model, bits=bits, group_size=group, include_lm_head=False), ids)
    config = AtbQuantConfig(bits=bits, group_size=group)  # include_lm_head defaults to False at load time
    loaded = AutoModelForCausalLM.from_pretrained(path, quantization_config=config).eval()
    assert loaded.model.layers[1].mlp.up_proj.group_size == (group if bits == 8 else 32)
    assert isinstance(loaded.model.layers[1].mlp.up_proj, QuantLinear)
    assert loaded.model.layers[1].mlp.up_proj.weight.dtype == (torch.int8 if bits == 8 else torch.uint8)
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=0, atol=0)

    loaded.save_pretrained(tmp_path / "quantized")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "quantized").eval()
    assert reloaded.config.quantization_config.bits == bits
    assert reloaded.model.layers[1].mlp.up_proj.group_size == (group if bits == 8 else 32)
    assert isinstance(reloaded.model.layers[0].self_attn.v_proj, QuantLinear)
    torch.testing.assert_close(_logits(reloaded, ids), expected, rtol=0, atol=0)
    with pytest.raises(QuantizationError, match="already quantized"):
        optimum_atb.quantize(reloaded, bits=8)


def test_save_after_in_place_quantize_roundtrips(tmp_path):
    model = optimum_atb.quantize(_tiny(), bits=4, group_size=32)
    ids = torch.randint(0, 128, (1, 9))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), rtol=0, atol=0)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32)])
def test_quantized_model_on_the_triton_backend_computes_its_dequantized_weights(bits, group):
    """The whole model (in Triton's interpreter) against the same model with every QuantLinear replaced by
    an fp32 nn.Linear holding its dequantized weight: what the kernels compute, with nothing rounded."""
    base = _tiny()
    model = optimum_atb.quantize(copy.deepcopy(base), bits=bits, group_size=group)
    exact = rounded_reference(base, model)
    ids = torch.randint(0, 128, (2, 12))
    with optimum_atb.use_backend("triton"):
        got = _logits(model, ids)
    want = _logits(exact, ids)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
