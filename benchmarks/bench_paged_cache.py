"""Paged KV cache: memory held for mixed-length batches, and decode speed at long context on SmolLM2.

1. KV bytes for 8 sequences of mixed lengths (50 to 2,000 tokens), SmolLM2's KV shapes (30 layers, 3 KV heads,
   head_dim 64, fp32), filled with random K/V through each cache's own write path: PagedCache (pads are not
   stored; the bytes of its allocated blocks, and of its whole pool when sized exactly), DynamicCache (a padded
   [B, H, max_len, D] per layer) and StaticCache (sized for max_len + the new tokens). The paged bound checked:
   allocated <= the real tokens' bytes + one block per sequence.
2. Decode tokens/s, prompt 1,500 tokens, 256 new, batch 4: stock DynamicCache and StaticCache against
   ``to_atb()`` + PagedCache (and ``to_atb()`` + DynamicCache, to separate the cache from the other fusions).
   Decode speed runs from the first new token to the last (each step time-stamped), so prefill is excluded.

``--quick`` runs a reduced version (lengths / 4, prompt 256, 16 new tokens, batch 2) for shared machines.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from transformers import DynamicCache, StaticCache

import optimum_atb
from optimum_atb import PagedCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (sibling module; this folder is not an installed package)

LENGTHS = [50, 180, 420, 700, 1000, 1350, 1700, 2000]


def _cache_bytes(cache) -> int:
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in (layer.keys, layer.values)
        if t is not None
    )


def kv_memory(config, lengths: list[int], new_tokens: int) -> dict:
    """Bytes each cache holds after writing `lengths[i]` tokens for sequence i (random K/V, no model run)."""
    b, n = len(lengths), max(lengths)
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    mask = torch.zeros(b, n, dtype=torch.long)
    for i, length in enumerate(lengths):
        mask[i, n - length :] = 1  # left padding, as generate() uses
    paged = PagedCache(config, block_size=16)
    paged.size_for(b, n)
    dynamic, static = DynamicCache(config=config), StaticCache(config=config, max_cache_len=n + new_tokens)
    q = torch.randn(b, n, config.num_attention_heads, dim)
    for layer in range(config.num_hidden_layers):
        k, v = torch.randn(b, n, heads, dim), torch.randn(b, n, heads, dim)
        paged.paged_attention_forward(layer_idx=layer, query=q, key=k, value=v, attention_mask=mask)
        for cache in (dynamic, static):
            cache.update(k.transpose(1, 2), v.transpose(1, 2), layer)
    stats = paged.memory_stats()
    token_bytes = 2 * heads * dim * 4 * config.num_hidden_layers
    bound = (sum(lengths) + b * paged.block_size) * token_bytes
    return {
        "lengths": lengths,
        "real_token_bytes": sum(lengths) * token_bytes,
        "paged_allocated_bytes": stats["allocated_bytes"],
        "paged_bound_bytes": bound,
        "paged_within_bound": stats["allocated_bytes"] <= bound,
        "paged_wasted_slots": stats["wasted_slots"],
        "dynamic_bytes": _cache_bytes(dynamic),
        "static_bytes": _cache_bytes(static),
    }


def decode_speed(model, tok, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> list[harness.Row]:
    inputs = harness.make_inputs(tok, batch, prompt_len=prompt_len)
    converted = copy.deepcopy(model).to_atb()
    configs = {
        "stock DynamicCache": (model, {}),
        "stock StaticCache": (model, {"cache_implementation": "static"}),
        "to_atb + DynamicCache": (converted, {}),
        "to_atb + PagedCache": (converted, {"cache_implementation": "atb_paged"}),
    }
    speed, kv = {}, {}
    for name, (m, kwargs) in configs.items():
        speed[name] = harness.decode_rate(m, inputs, new_tokens, repeats, **kwargs)
        with torch.inference_mode():
            out = m.generate(
                **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                return_dict_in_generate=True, **kwargs,
            )  # fmt: skip
        cache = out.cache
        kv[name] = (
            cache.memory_stats()["pool_bytes"] if isinstance(cache, PagedCache) else _cache_bytes(cache)
        )
    rows = []
    for base in ("stock DynamicCache", "stock StaticCache"):
        for name in ("to_atb + DynamicCache", "to_atb + PagedCache"):
            rows.append(
                harness.Row(
                    "decode long context",
                    name,
                    base,
                    speed[base],
                    speed[name],
                    extra={"kv_bytes": kv[name], "baseline_kv_bytes": kv[base]},
                )  # fmt: skip
            )
    return rows


SIZES = {  # lengths of the memory test; batch, prompt length, new tokens, repeats of the decode test
    "quick": ([x // 4 for x in LENGTHS], 2, 256, 16, 2),
    "full": (LENGTHS, 4, 1500, 256, 3),
}


def memory_rows(mem: dict) -> list[harness.Row]:
    """The KV-bytes results as rows: paged allocated bytes against each stock cache (ratio < 1 = smaller)."""
    extra = {"lengths": mem["lengths"], "paged_within_bound": mem["paged_within_bound"]}
    return [
        harness.Row(
            "KV bytes, 8 mixed lengths",
            "PagedCache (allocated)",
            f"{name}",
            mem[key],
            mem["paged_allocated_bytes"],
            unit="bytes",
            extra=extra,
        )  # fmt: skip
        for name, key in (
            ("real tokens", "real_token_bytes"),
            ("DynamicCache", "dynamic_bytes"),
            ("StaticCache", "static_bytes"),
        )  # fmt: skip
    ]


def run(suite: str = "full", device: str = "cpu") -> list[harness.Row]:
    """Entry point of ``benchmarks/run_all.py``: memory rows then decode rows (CPU only)."""
    if device != "cpu":
        raise SystemExit("bench_paged_cache measures the CPU path only")
    lengths, batch, prompt_len, new_tokens, repeats = SIZES[suite]
    model, tok = harness.load_smollm2()
    mem = kv_memory(model.config, lengths, new_tokens)
    return memory_rows(mem) + decode_speed(model, tok, batch, prompt_len, new_tokens, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes for a shared machine")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    threads = harness.setup(args.threads)
    suite = "quick" if args.quick else "full"
    lengths, batch, prompt_len, new_tokens, repeats = SIZES[suite]
    print(f"# bench_paged_cache --suite {suite}: {harness.machine_description()}")
    print(f"optimum-atb {optimum_atb.__version__}, {threads} threads")
    model, tok = harness.load_smollm2()
    mem = kv_memory(model.config, lengths, new_tokens)
    print("\n## KV bytes, 8 sequences of mixed lengths")
    for key, value in mem.items():
        print(f"- {key}: {value}")
    print(f"\n## Decode, prompt {prompt_len}, {new_tokens} new tokens, batch {batch}, median of {repeats}")
    rows = decode_speed(model, tok, batch, prompt_len, new_tokens, repeats)
    harness.print_rows(rows)
    for r in rows:
        print(
            f"- {r.config} vs {r.baseline}: KV {r.extra['kv_bytes']} vs {r.extra['baseline_kv_bytes']} bytes"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"kv_memory": mem, "decode": [r.as_dict() for r in memory_rows(mem) + rows]}, f, indent=1
            )


if __name__ == "__main__":
    main()
