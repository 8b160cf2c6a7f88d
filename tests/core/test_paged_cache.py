"""PagedCache against DynamicCache: same tokens under stock attention and through the paged-attention path.

The paged path is what a patched attention module does after ``to_atb()``: ``_paged_attention_forward`` below
is a minimal stand-in (q/k/v projections, the model's own rotary, then ``cache.paged_attention_forward``), so
these tests exercise the cache without depending on the patches.
"""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
from transformers import (
    DynamicCache,
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.generation import configuration_utils

import optimum_atb
from optimum_atb import KVCacheCapacityError, PagedCache

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 8}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {}),
    "phi3": (Phi3Config, Phi3ForCausalLM, {}),
    "gemma": (GemmaConfig, GemmaForCausalLM, {}),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, {"sliding_window": 8}),
}
GREEDY = dict(max_new_tokens=14, min_new_tokens=14, do_sample=False)


def tiny_model(family: str, attn: str = "sdpa"):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = config_cls(**TINY, **extra)
    if family == "gemma2":
        attn = "eager"  # softcap: stock sdpa refuses it
    config._attn_implementation = attn
    return model_cls(config).eval()


def _paged_attention_forward(
    self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kw
):
    """What a patched attention does: project, rotate, hand q/k/v (B, S, H, D) to the paged cache."""
    b, s = hidden_states.shape[:2]
    hd = self.head_dim
    if hasattr(self, "qkv_proj"):  # phi3
        nq, nk = self.config.num_attention_heads * hd, self.config.num_key_value_heads * hd
        q, k, v = self.qkv_proj(hidden_states).split([nq, nk, nk], dim=-1)
    else:
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    q, k, v = (t.view(b, s, -1, hd) for t in (q, k, v))
    if hasattr(self, "q_norm"):  # qwen3
        q, k = self.q_norm(q), self.k_norm(k)
    cos, sin = position_embeddings
    rotate = sys.modules[type(self).__module__].apply_rotary_pos_emb
    q, k = (t.transpose(1, 2) for t in rotate(q.transpose(1, 2), k.transpose(1, 2), cos, sin))
    window = getattr(self, "sliding_window", None)
    if window is None and type(self).__name__.startswith("Mistral"):
        window = self.config.sliding_window
    assert getattr(cache, "is_atb_paged", False)
    out = cache.paged_attention_forward(
        layer_idx=self.layer_idx, query=q, key=k, value=v, attention_mask=attention_mask,
        scaling=self.scaling, sliding_window=window, softcap=getattr(self.config, "attn_logit_softcapping", None),
    )  # fmt: skip
    assert out.shape == (b, s, self.config.num_attention_heads, hd)
    return self.o_proj(out.reshape(b, s, -1)), None


def paged_copy(model, via: str = "stand-in"):
    """A copy of `model` whose attention goes through ``PagedCache.paged_attention_forward``: the test
    stand-in above, or the real thing (``to_atb()``)."""
    model = copy.deepcopy(model)
    if via == "to_atb":
        return model.to_atb()
    for module in model.modules():
        if type(module).__name__.endswith("Attention") and hasattr(module, "o_proj"):
            module.forward = types.MethodType(_paged_attention_forward, module)
    return model


def prompts(batch: int = 2, length: int = 9, pads: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if pads and batch > 1:
        ids[1, :pads], mask[1, :pads] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


# --------------------------------------------------------------------------------- parity with DynamicCache
@pytest.mark.parametrize("family", list(FAMILIES))
def test_stock_attention_left_padded_matches_dynamic_cache(family):
    model = tiny_model(family)
    inputs = prompts()  # 9-token prompts + 14 new tokens: past the 8-token window of mistral / gemma2
    ref = model.generate(**inputs, **GREEDY)
    cache = PagedCache(model.config, block_size=4)
    out = model.generate(**inputs, cache=cache, **GREEDY)
    assert torch.equal(out, ref)
    assert cache.get_seq_length() == ref.shape[1] - 1


@pytest.mark.parametrize("via", ["stand-in", "to_atb"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_paged_path_matches_dynamic_cache(family, via):
    model = tiny_model(family)
    sliding = FAMILIES[family][2].get("sliding_window") is not None
    # padded rows: the paged path windows over real tokens, stock transformers over mask columns (pads
    # included), so sliding-window families are compared on unpadded prompts.
    inputs = prompts(pads=0 if sliding else 3)
    ref = model.generate(**inputs, **GREEDY)
    cache = PagedCache(model.config, block_size=4)
    out = paged_copy(model, via).generate(**inputs, cache=cache, **GREEDY)
    assert torch.equal(out, ref)
    assert cache._mode == "paged"
    stats = cache.memory_stats()
    real = int(inputs["attention_mask"].sum()) + 2 * (GREEDY["max_new_tokens"] - 1)
    if not sliding:
        assert stats["tokens_stored"] == real  # pad tokens are not stored


def test_eager_and_cache_implementation_string():
    model = tiny_model("llama", attn="eager")
    inputs = prompts()
    ref = model.generate(**inputs, **GREEDY)
    assert torch.equal(model.generate(**inputs, cache_implementation="atb_paged", **GREEDY), ref)
    config = GenerationConfig(**GREEDY, cache_implementation="atb_paged")
    out = model.generate(**inputs, generation_config=config, return_dict_in_generate=True)
    assert isinstance(out.cache, PagedCache) and torch.equal(out.sequences, ref)
    # sized for the call: batch 2 x ceil(22 / 16) blocks (+1 each), on the default block size for cpu
    assert out.cache.block_size == 16 and out.cache.memory_stats()["num_blocks"] == 2 * (2 + 1)


def test_past_key_values_keyword_and_forward_with_paged_cache():
    model = tiny_model("llama")
    inputs = prompts()
    with pytest.warns(FutureWarning):
        out = model.generate(**inputs, past_key_values=PagedCache(model.config), **GREEDY)
    assert torch.equal(out, model.generate(**inputs, **GREEDY))
    ref = model(**inputs, cache=DynamicCache(config=model.config)).logits
    got = model(**inputs, cache=PagedCache(model.config)).logits
    torch.testing.assert_close(got, ref)


def test_register_is_idempotent_and_leaves_paged_alone():
    from transformers.generation.utils import GenerationMixin

    wrapped = GenerationMixin._prepare_cache_for_generation
    optimum_atb.paged_cache.register()
    assert GenerationMixin._prepare_cache_for_generation is wrapped
    assert configuration_utils.ALL_CACHE_IMPLEMENTATIONS.count("atb_paged") == 1
    assert "paged" not in configuration_utils.ALL_CACHE_IMPLEMENTATIONS


@pytest.mark.parametrize("path", ["stock", "to_atb"])
def test_beam_search_sampling_and_assisted(path):
    model = tiny_model("llama")
    target = paged_copy(model, "to_atb") if path == "to_atb" else model
    inputs = prompts()
    beams = dict(num_beams=3, max_new_tokens=10, do_sample=False)
    assert torch.equal(
        target.generate(**inputs, cache_implementation="atb_paged", **beams),
        model.generate(**inputs, **beams),
    )
    sample = dict(do_sample=True, num_return_sequences=2, max_new_tokens=10)
    torch.manual_seed(7)
    ref = model.generate(**inputs, **sample)
    torch.manual_seed(7)
    assert torch.equal(target.generate(**inputs, cache_implementation="atb_paged", **sample), ref)
    torch.manual_seed(1)
    draft = LlamaForCausalLM(LlamaConfig(**{**TINY, "num_hidden_layers": 1})).eval()
    one = {k: v[:1] for k, v in inputs.items()}
    ref = model.generate(**one, assistant_model=draft, **GREEDY)
    cache = PagedCache(model.config, block_size=4)
    assert torch.equal(target.generate(**one, assistant_model=draft, cache=cache, **GREEDY), ref)
    assert cache.get_seq_length() == ref.shape[1] - 1


# --------------------------------------------------------------------------------- cache mechanics
def _prefill(model, cache, length=10, batch=2):
    ids = torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(1))
    return model(input_ids=ids, cache=cache).logits


def _step(model, cache, token=5, batch=2):
    return model(input_ids=torch.full((batch, 1), token), cache=cache).logits


def test_crop_and_repeat_interleave_match_dynamic_cache():
    model = tiny_model("llama")
    paged, dyn = PagedCache(model.config, block_size=4), DynamicCache(config=model.config)
    for cache in (paged, dyn):
        _prefill(model, cache)
        _step(model, cache)
        cache.crop(0)
        cache.crop(-2)
        cache.batch_repeat_interleave(2)
    assert paged.get_seq_length() == 9
    assert paged.memory_stats()["allocated_blocks"] == 2 * 3  # 9 tokens a row, repeated rows share blocks
    torch.testing.assert_close(_step(model, paged, batch=4), _step(model, dyn, batch=4))
    # copy on write: in each pair one row copies the shared partial block, the other then writes in place
    assert paged.memory_stats()["allocated_blocks"] == 2 * 3 + 2
    for cache in (paged, dyn):
        cache.batch_select_indices(torch.tensor([3, 0]))
    torch.testing.assert_close(_step(model, paged), _step(model, dyn))
    with pytest.raises(ValueError, match="negative"):
        paged.crop(2)


def test_crop_rows_frees_per_row_and_needs_the_paged_path():
    model = tiny_model("llama")
    stock_filled = PagedCache(model.config, block_size=4)
    _prefill(model, stock_filled)
    with pytest.raises(RuntimeError, match="paged attention path"):
        stock_filled.crop_rows([1, 0])
    paged = PagedCache(model.config, block_size=4)
    converted = paged_copy(model, "to_atb")
    _prefill(converted, paged)  # 10 tokens a row: 3 blocks each
    paged.crop_rows([7, 0])
    assert [s.num_tokens for s in paged._groups[0].tables.seqs] == [3, 10]
    assert paged.memory_stats()["allocated_blocks"] == 1 + 3
    for bad in ([1], [-1, 0]):
        with pytest.raises(ValueError, match="one count >= 0 per row"):
            paged.crop_rows(bad)


def test_get_mask_sizes_match_dynamic_cache():
    model = tiny_model("gemma2")  # layer 0 sliding (window 8), layer 1 full
    paged, dyn = PagedCache(model.config, block_size=4), DynamicCache(config=model.config)
    for n in (5, 1, 1, 4, 1):
        for layer in (0, 1):
            assert paged.get_mask_sizes(n, layer) == dyn.get_mask_sizes(n, layer)
        ids = torch.randint(3, 128, (1, n))
        torch.testing.assert_close(
            model(input_ids=ids, cache=paged).logits, model(input_ids=ids, cache=dyn).logits
        )
    assert paged.get_seq_length() == dyn.get_seq_length() == 12
    assert paged.is_sliding == [True, False] and paged.is_croppable


def test_sliding_window_memory_stays_bounded():
    model = tiny_model("mistral")  # window 8
    cache = PagedCache(model.config, block_size=4)
    paged_copy(model).generate(
        input_ids=torch.randint(3, 128, (1, 5)), cache=cache, max_new_tokens=40, min_new_tokens=40
    )
    assert cache.get_seq_length() == 44
    # before each step: keep the last window-1 = 7 tokens -> at most 3 blocks live, plus the one being written
    assert cache.memory_stats()["allocated_blocks"] <= 3


def test_capacity_error_before_any_write_and_cache_stays_usable():
    model = tiny_model("llama")
    paged = PagedCache(model.config, block_size=4, num_blocks=6)
    dyn = DynamicCache(config=model.config)
    for cache in (paged, dyn):
        _prefill(model, cache, length=10)  # 2 rows x 3 blocks: the pool is full
    before = paged.memory_stats()
    pool = paged._groups[0].k_pools[0].clone()
    with pytest.raises(
        KVCacheCapacityError, match=r"needs 2 more KV blocks .* 0 of 6 are free.*num_blocks>=8"
    ):
        _prefill(model, paged, length=4)
    assert paged.memory_stats() == before and paged.get_seq_length() == 10
    assert torch.equal(paged._groups[0].k_pools[0], pool)
    torch.testing.assert_close(_step(model, paged), _step(model, dyn))  # 11 tokens: still fits


def test_sizing_from_max_memory_and_errors():
    model = tiny_model("llama")
    per_block = 2 * 4 * 2 * 16 * 4 * 2  # K+V x block x heads x dim x fp32 bytes x layers
    cache = PagedCache(model.config, block_size=4, max_memory=5 * per_block + 7)
    _prefill(model, cache, length=4, batch=1)
    assert cache.memory_stats()["num_blocks"] == 5 and cache.memory_stats()["pool_bytes"] == 5 * per_block
    with pytest.raises(ValueError, match="not both"):
        PagedCache(model.config, num_blocks=4, max_memory=1 << 20)
    with pytest.raises(ValueError, match="holds no block"):
        _prefill(model, PagedCache(model.config, max_memory=10), batch=1)


def test_paged_path_rejects_right_padding_and_mixed_paths():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    cache = PagedCache(model.config)
    with pytest.raises(ValueError, match="left padding only"):
        paged_copy(model)(input_ids=ids, attention_mask=mask, cache=cache)
    assert cache.get_seq_length() == 0 and cache.memory_stats()["allocated_blocks"] == 0
    model(input_ids=ids, cache=cache)
    with pytest.raises(RuntimeError, match="one path per cache"):
        paged_copy(model)(input_ids=ids[:, :1], cache=cache)


def test_free_sequence_and_reset_return_every_block():
    model = tiny_model("llama")
    cache = PagedCache(model.config, block_size=4)
    _prefill(model, cache, length=9)
    assert cache.memory_stats()["allocated_blocks"] == 6 and cache.memory_stats()["tokens_stored"] == 18
    assert cache.memory_stats()["wasted_slots"] == 6
    cache.free_sequence(1)
    assert cache.memory_stats()["allocated_blocks"] == 3
    _step(model, cache)  # row 1 stores nothing more
    assert cache.memory_stats()["tokens_stored"] == 10
    cache.reset()
    assert cache.memory_stats()["allocated_blocks"] == 0 and cache.get_seq_length() == 0
    torch.testing.assert_close(_prefill(model, cache), _prefill(model, DynamicCache(config=model.config)))


# --------------------------------------------------------------------------------- the real model
@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_left_padded_beam_sampling_assisted(smollm2, smollm2_tokenizer):
    tok = smollm2_tokenizer
    tok.padding_side = "left"
    inputs = dict(
        tok(
            ["The capital of France is", "Once upon a time, in a small village, there"],
            return_tensors="pt",
            padding=True,
        )
    )
    paged = paged_copy(smollm2, "to_atb")
    greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    ref = smollm2.generate(**inputs, **greedy)
    assert torch.equal(paged.generate(**inputs, cache_implementation="atb_paged", **greedy), ref)
    beams = dict(num_beams=3, max_new_tokens=4, do_sample=False)
    assert torch.equal(
        paged.generate(**inputs, cache_implementation="atb_paged", **beams),
        smollm2.generate(**inputs, **beams),
    )
    sample = dict(do_sample=True, num_return_sequences=2, max_new_tokens=4)
    torch.manual_seed(3)
    ref = smollm2.generate(**inputs, **sample)
    torch.manual_seed(3)
    assert torch.equal(paged.generate(**inputs, cache_implementation="atb_paged", **sample), ref)
    draft = copy.deepcopy(smollm2)
    draft.model.layers = draft.model.layers[:2]
    draft.config.num_hidden_layers = 2
    one = {k: v[1:] for k, v in inputs.items()}
    ref = smollm2.generate(**one, assistant_model=draft, **greedy)
    assert torch.equal(
        paged.generate(**one, assistant_model=draft, cache=PagedCache(smollm2.config), **greedy), ref
    )
