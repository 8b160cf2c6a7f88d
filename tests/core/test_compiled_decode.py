"""to_atb(compile=True): generate() decodes through a compiled static-shape step, with stock's tokens."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import optimum_atb
from optimum_atb import BackendUnavailableError, CompileOptionsError, compiled_decode

pytestmark = pytest.mark.slow  # each test compiles a decode step (10-30 s on 2 cores)


def _stock():
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15)
    return model


def _left_padded_batch():
    ids = torch.randint(1, 96, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 4, 7)):
        ids[row, :pad], mask[row, :pad] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def _greedy(model, inputs, new_tokens=12):
    with torch.inference_mode():
        return model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )


def test_compiled_decode_gives_stock_tokens_and_reverts():
    stock = _stock()
    inputs = _left_padded_batch()
    expected = _greedy(stock, inputs)
    before = (stock.generation_config.cache_implementation, stock.generation_config.compile_config)

    model = stock.to_atb(compile=True)
    assert model.generation_config.cache_implementation == "static"
    torch.testing.assert_close(_greedy(model, inputs), expected, rtol=0, atol=0)
    assert hasattr(model, "_compiled_call")  # the decode steps really went through torch.compile
    torch.testing.assert_close(_greedy(model, inputs), expected, rtol=0, atol=0)  # the compiled step, reused

    optimum_atb.revert(model)
    assert (model.generation_config.cache_implementation, model.generation_config.compile_config) == before
    assert not hasattr(model, "_compiled_call")
    torch.testing.assert_close(_greedy(model, inputs), expected, rtol=0, atol=0)


def test_compiled_decode_of_a_quantized_model_matches_its_eager_decode():
    inputs = _left_padded_batch()
    eager = _stock().to_atb(quantize="int8")
    compiled = _stock().to_atb(quantize="int8", compile=True)
    torch.testing.assert_close(_greedy(compiled, inputs), _greedy(eager, inputs), rtol=0, atol=0)
    assert hasattr(compiled, "_compiled_call")


def test_missing_compiler_raises_before_converting(monkeypatch):
    from torch._inductor import config

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(config.cpp, "cxx", (None, "g++"))
    model = _stock()
    with pytest.raises(BackendUnavailableError, match="C\\+\\+ compiler"):
        model.to_atb(compile=True)
    assert getattr(model, "_atb_state", None) is None
    assert model.generation_config.cache_implementation is None


def test_cpp_wrapper_option_compiles_every_graph_with_it_and_gives_stock_tokens(monkeypatch):
    """compile_options reach the decode step (transformers' CompileConfig) and the speculative decoder's
    compiled forwards; with inductor's C++ wrapper the tokens stay stock's."""
    compiled_options = []
    real_compile = torch.compile

    def recording_compile(*args, **kwargs):
        compiled_options.append(kwargs.get("options"))
        return real_compile(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    stock = _stock()
    inputs = _left_padded_batch()
    expected = _greedy(stock, inputs)
    before = stock.generation_config.compile_config
    model = stock.to_atb(compile=True, compile_options={"cpp_wrapper": True})
    config = model.generation_config.compile_config
    assert config.options == {"cpp_wrapper": True} and config.mode is None  # torch takes one of the two
    torch.testing.assert_close(_greedy(model, inputs), expected, rtol=0, atol=0)
    assert len(compiled_options) == 3  # the decode step, the single-token and the wide verify forwards
    assert all(options == {"cpp_wrapper": True} for options in compiled_options)
    optimum_atb.revert(model)
    assert model.generation_config.compile_config == before


def test_compile_options_update_the_cpu_default_of_the_decode_step():
    """On a CPU the decode step has the C++ wrapper unless compile_options turn it off; the speculative
    decoder's graphs and other devices get the options as given (nothing compiles here)."""
    model = _stock().to_atb(compile=True)
    assert model.generation_config.compile_config.options == {"cpp_wrapper": True}
    assert model._atb_compiled_forward.options is None  # inductor's defaults
    options = {"cpp_wrapper": False, "size_asserts": False}
    other = _stock().to_atb(compile=True, compile_options=options)
    assert other.generation_config.compile_config.options == options
    assert other._atb_compiled_forward.options == options
    only_asserts = _stock().to_atb(compile=True, compile_options={"size_asserts": False})
    assert only_asserts.generation_config.compile_config.options == {
        "cpp_wrapper": True,
        "size_asserts": False,
    }
    assert only_asserts._atb_compiled_forward.options == {"size_asserts": False}
    assert compiled_decode.decode_options(None, torch.device("cuda")) is None
    assert compiled_decode.decode_options(options, torch.device("cuda")) == options


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"compile_options": {"cpp_wrapper": True}}, "compile=True"),
        ({"compile": True, "compile_options": ["cpp_wrapper"]}, "dict of inductor option names"),
        ({"compile": True, "compile_options": {"cpp_wraper": True}}, "unknown inductor option.*cpp_wraper"),
    ],
)
def test_bad_compile_options_raise_before_converting(kwargs, match):
    model = _stock()
    with pytest.raises(CompileOptionsError, match=match):
        model.to_atb(quantize="int8", **kwargs)
    assert getattr(model, "_atb_state", None) is None
    assert model.generation_config.cache_implementation is None
    assert all(
        isinstance(m, torch.nn.Linear) for m in (model.model.layers[0].self_attn.q_proj, model.lm_head)
    )


def test_speculative_verify_of_a_compiled_model_runs_compiled_and_gives_stock_tokens():
    """After to_atb(compile=True), generate(assistant_model=...) verifies through compiled forwards on a
    static cache (optimum_atb.speculative.static_slots), with stock's greedy tokens; revert drops them."""
    stock = _stock()
    inputs = _left_padded_batch()
    expected = _greedy(stock, inputs)
    draft = copy.deepcopy(stock)  # a draft that is often but not always right
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    model = stock.to_atb(compile=True)
    out = _greedy(model, {**inputs, "assistant_model": draft})
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    stats = model.atb_speculative_stats
    assert stats.proposed_tokens > stats.accepted_tokens > 0  # drafts were verified, some rejected
    assert model._atb_compiled_forward.compiles  # the verify forwards went through torch.compile
    optimum_atb.revert(model)
    assert "_atb_compiled_forward" not in model.__dict__


def _identity_guards(model, ids) -> set[str]:
    """Identity guards ("a is b" between two paths to one object) of a compiled call of `model`."""
    torch._dynamo.reset()  # a cached graph of an earlier model of the same structure would be reused
    entries = []

    def record(guards):
        entries.extend(guards)
        return [True] * len(guards)

    with torch.no_grad():
        torch.compile(model, dynamic=False, options={"guard_filter_fn": record})(ids)
    assert entries
    return {e.name for e in entries if e.guard_type == "DUPLICATE_INPUT" and not e.name.startswith("G[")}


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_conversion_adds_no_identity_guards_to_compiled_graphs(quantize):
    """Identity guards run in Python on every call of a compiled graph (~1-3 us each): conversion must
    not add one per module (a fused forward bound on the instance gave ``module is
    module.forward.__self__``; a quantized layer's weight reachable from its buffer and its prepared
    kernel state two more; a dict shared by every MLP plan one more per layer)."""
    ids = torch.tensor([[5, 9, 17, 3]])
    stock = _stock()
    model = _stock().to_atb(quantize=quantize)
    model(ids)  # prepares the quantized layers eagerly, as generate's prefill does
    assert _identity_guards(model, ids) <= _identity_guards(stock, ids)
