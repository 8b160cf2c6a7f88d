"""Decode speed: stock transformers (sdpa) vs ``model.to_atb()`` and ``model.to_atb(compile=True)`` on
SmolLM2-135M, in one run.

Decode tokens/s excludes the prefill: every step is time-stamped and the rate runs from the first new
token to the last, the median of ``--repeats`` greedy runs with EOS disabled (see benchmarks/harness.py).
Stock and the variants alternate run by run, so a drift of the machine's speed hits them alike.

    python benchmarks/bench_decode.py                 # fp32 and bf16, batch 1 and 8
    python benchmarks/bench_decode.py --quick         # short version for a shared machine
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402  (sibling module; this folder is not an installed package)
import torch  # noqa: E402

import optimum_atb  # noqa: E402, F401  (attaches to_atb)

SUITE = {"quick": (32, 1), "full": (128, 3)}  # new tokens, repeats


def measure(
    dtypes: list[str], batches: list[int], prompt_len: int, new_tokens: int, repeats: int
) -> list[harness.Row]:
    """Stock sdpa vs to_atb() and to_atb(compile=True) for every dtype x batch, side by side in this
    process (the compiled step is compiled in the warm-up run, which is not timed)."""
    rows = []
    for dtype_name in dtypes:
        stock, tok = harness.load_smollm2(getattr(torch, dtype_name))
        stock.set_attn_implementation("sdpa")
        variants = {
            "to_atb": copy.deepcopy(stock).to_atb(),
            "to_atb(compile=True)": copy.deepcopy(stock).to_atb(compile=True),
        }
        for batch in batches:
            inputs = harness.make_inputs(tok, batch, prompt_len=prompt_len)
            models = {"stock": stock, **variants}
            for model in models.values():  # one warm-up run each (compiles the compiled step), result unused
                harness.decode_rate(model, inputs, new_tokens, repeats=1, warmup=False)
            runs = {name: [] for name in models}
            for _ in range(repeats):
                for name, model in models.items():
                    runs[name].append(harness.decode_rate(model, inputs, new_tokens, repeats=1, warmup=False))
            base = statistics.median(runs["stock"])
            line = f"{dtype_name} batch {batch}: stock {base:.1f} tok/s"
            for name in variants:
                value = statistics.median(runs[name])
                rows.append(
                    harness.Row(
                        benchmark="decode",
                        config=f"{name} {dtype_name} batch {batch}",
                        baseline="stock sdpa",
                        baseline_value=base,
                        value=value,
                        extra={
                            "ms_per_step_stock": 1000 * batch / base,
                            "ms_per_step_atb": 1000 * batch / value,
                        },
                    )
                )
                line += f", {name} {value:.1f} tok/s"
            print(line, flush=True)
        del stock, variants
    return rows


def run(suite: str = "quick", device: str = "cpu") -> list[harness.Row]:
    """Entry point of benchmarks/run_all.py."""
    if device != "cpu":
        raise SystemExit("bench_decode measures the CPU path")
    new_tokens, repeats = SUITE[suite]
    return measure(["float32", "bfloat16"], [1, 8], 64, new_tokens, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="32 new tokens, 1 repeat (noisy)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    new_tokens, repeats = SUITE["quick" if args.quick else "full"]
    harness.setup(args.threads)
    print(harness.machine_description())
    rows = measure(
        args.dtypes.split(","),
        [int(b) for b in args.batches.split(",")],
        args.prompt_len,
        args.new_tokens or new_tokens,
        args.repeats or repeats,
    )
    harness.print_rows(rows)
    harness.save_rows(rows, args.json)


if __name__ == "__main__":
    main()
