"""Decode and prefill speed, peak memory and weight bytes of quantized SmolLM2-135M against stock fp32 and
bf16.

    python benchmarks/bench_quant.py            # full: batch 1 and 8, 128 new tokens, 3 repeats
    python benchmarks/bench_quant.py --quick    # short: batch 1, 16 new tokens, 1 repeat

Every configuration runs in its own child process (peak RSS is per process), with the same allocator
settings and thread count; results are ratios against stock measured in the same run. "decode" is
`generate`'s tokens/s, prefill included (the convention of the project's baselines); "decode steps" is
what the same runs' decode steps alone produce, from the first new token to the last (prefill excluded,
as llama.cpp's token-generation figure); "prefill" is one forward over the 64-token prompts, prompt
tokens/s.

    python benchmarks/bench_quant.py --interleaved   # all configurations in one process, timed in turn

On a host whose speed drifts during a run (shared or virtualised CPUs), one configuration after another
can be measured in a fast and a slow phase: `--interleaved` loads every configuration in this process and
times one generate and one prefill of each in turn per repeat (medians of the rounds), so every ratio compares runs made
minutes apart at most. Peak RSS is not measured in that mode (it is per process).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from harness import (  # noqa: E402
    Row,
    load_smollm2,
    machine_description,
    make_inputs,
    print_rows,
    setup,
    time_generate,
    time_prefill,
)

# "int8" / "int4": quantize(bits=8) (per channel) / quantize(bits=4) (groups of 32, the default);
# "-gN": one scale per group of N input features (int4 groups of 64 measure the default's choice; 128 does
# not divide SmolLM2's 576 input features); "+compile-py": compiled with compile_options={"cpp_wrapper": False}
# (inductor's Python wrapper instead of the CPU default, its C++ one)
CONFIGS = (
    "stock-fp32", "stock-bf16", "int8", "int8-g32", "int4", "int4-g64", "gguf-q4_1",
    "int8+compile", "int4+compile", "int4+compile-py", "int4-g64+compile", "gguf-q4_1+compile",
)  # fmt: skip
COMPILE_SUFFIXES = {"+compile": None, "+compile-py": {"cpp_wrapper": False}}  # suffix: compile_options

PROMPT_LEN = 64  # tokens per row
# what each configuration records per batch size: generate's tokens/s (prefill included), its decode steps'
# own tokens/s, and the prefill's prompt tokens/s
MEASURES = ("tokens_per_s", "decode_steps", "prefill")
KINDS = ("stock-fp32", "stock-bf16", "int8", "int4", "gguf-q4_1")


def parse_config(config: str) -> tuple[str, int | None, bool, dict | None] | None:
    """(kind of KINDS, group size or None, compiled, compile options) of a configuration name, None for an
    unknown one: int8/int4 take an optional "-gN" group size, every kind but stock a "+compile" or
    "+compile-py"."""
    name, suffix, options = config, "", None
    for candidate, candidate_options in COMPILE_SUFFIXES.items():
        if config.endswith(candidate):
            name, suffix, options = config.removesuffix(candidate), candidate, candidate_options
    compiled = bool(suffix)
    kind, _, group = name.partition("-g")
    if kind not in KINDS or (compiled and kind.startswith("stock")):
        return None
    if group and (kind not in ("int8", "int4") or not group.isdigit()):
        return None
    return kind, int(group) if group else None, compiled, options


def weight_bytes(model) -> int:
    """Bytes of every parameter and buffer (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def peak_rss_mib() -> float:
    """This process's peak resident memory. /proc's VmHWM belongs to the current address space; getrusage's
    ru_maxrss survives fork + exec and so reports the parent's size when a big parent (the bench matrix)
    starts this child."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(config: str):
    """`config` is a name of CONFIGS: "+compile" means ``to_atb(compile=True)`` (fused modules and a
    compiled decode step; "+compile-py" with inductor's Python wrapper); without it the quantized layers run
    in the stock modules, eagerly."""
    import optimum_atb

    kind, group_size, compiled, options = parse_config(config)
    if kind == "gguf-q4_1":
        from harness import GGUF_FILE, smollm2_dir
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=GGUF_FILE)
        model = optimum_atb.load_gguf(smollm2_dir(), GGUF_FILE)
        return (model.to_atb(compile=True, compile_options=options) if compiled else model), tok
    model, tok = load_smollm2(torch.bfloat16 if kind == "stock-bf16" else torch.float32)
    if kind.startswith("stock"):
        return model, tok
    if compiled:
        model.to_atb(quantize=kind, group_size=group_size, compile=True, compile_options=options)
    else:
        optimum_atb.quantize(model, bits=8 if kind == "int8" else 4, group_size=group_size)
    return model, tok


def child(config: str, batches: list[int], new_tokens: int, repeats: int) -> None:
    """Measure one configuration; prints one JSON line."""
    setup()
    model, tok = build(config)
    result = {"config": config, "weight_bytes": weight_bytes(model), **{key: {} for key in MEASURES}}
    for batch in batches:
        inputs = make_inputs(tok, batch, prompt_len=PROMPT_LEN)
        timing = time_generate(model, inputs, new_tokens, repeats=repeats, stamp_steps=True)
        result["tokens_per_s"][str(batch)] = timing.tokens_per_s
        result["decode_steps"][str(batch)] = timing.decode_tokens_per_s
        result["prefill"][str(batch)] = time_prefill(model, inputs, repeats=repeats).tokens_per_s
    result["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(result))


def measure(quick: bool, configs: list[str]) -> list[Row]:
    """Each configuration in its own child process; rows against stock fp32 and stock bf16."""
    results = {}
    for config in configs:
        cmd = [sys.executable, __file__, "--child", config] + (["--quick"] if quick else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[config] = json.loads(out.strip().splitlines()[-1])
    return rows_of(results)


def measure_interleaved(configs: list[str], batches: list[int], new_tokens: int, repeats: int) -> list[Row]:
    """Every configuration in this process; each repeat times one generate and one prefill of each
    configuration in turn (after one untimed warm-up each, which also compiles), tokens/s the median of the
    repeats."""
    models = {}
    for config in configs:
        print(f"# loading {config}", file=sys.stderr, flush=True)
        models[config] = build(config)
    results = {
        c: {"weight_bytes": weight_bytes(m), **{key: {} for key in MEASURES}} for c, (m, _) in models.items()
    }
    for batch in batches:
        inputs = {c: make_inputs(tok, batch, prompt_len=PROMPT_LEN) for c, (_, tok) in models.items()}
        runs = {c: {key: [] for key in MEASURES} for c in configs}
        for round_ in range(repeats + 1):
            for config in configs:
                model = models[config][0]
                decode = time_generate(
                    model, inputs[config], new_tokens, repeats=1, warmup=0, stamp_steps=True
                )
                prefill = time_prefill(model, inputs[config], repeats=1, warmup=0)
                if round_:  # round 0 warms up (and compiles)
                    runs[config]["tokens_per_s"].append(decode.tokens_per_s)
                    runs[config]["decode_steps"].append(decode.decode_tokens_per_s)
                    runs[config]["prefill"].append(prefill.tokens_per_s)
                    print(
                        f"# b{batch} round {round_} {config}: {decode.tokens_per_s:.1f} tokens/s "
                        f"(decode steps {decode.decode_tokens_per_s:.1f}), prefill {prefill.tokens_per_s:.0f} tokens/s",
                        file=sys.stderr,
                    )
        for config in configs:
            for key, values in runs[config].items():
                results[config][key][str(batch)] = statistics.median(values)
    return rows_of(results)


def rows_of(results: dict[str, dict]) -> list[Row]:
    """Rows of each configuration against stock fp32 and stock bf16 (where measured)."""
    rows = []
    for base in ("stock-fp32", "stock-bf16"):
        if base not in results:
            continue
        for config, r in results.items():
            if config.startswith("stock"):
                continue
            for key, name in (("tokens_per_s", "decode"), ("decode_steps", "decode steps")):
                for batch, value in r[key].items():
                    rows.append(Row(name, f"{config} b{batch}", base, results[base][key][batch], value))
            for batch, value in r["prefill"].items():
                label = f"{config} b{batch}, prompt {PROMPT_LEN}"
                rows.append(Row("prefill", label, base, results[base]["prefill"][batch], value))
            rows.append(
                Row(
                    "weights",
                    config,
                    base,
                    results[base]["weight_bytes"] / 2**20,
                    r["weight_bytes"] / 2**20,
                    "MiB",
                )
            )
            if "peak_rss_mib" in r:
                rows.append(
                    Row("peak RSS", config, base, results[base]["peak_rss_mib"], r["peak_rss_mib"], "MiB")
                )
    return rows


def run(suite: str = "quick", device: str = "cpu") -> list[Row]:
    """The matrix entry point (``benchmarks/run_all.py``)."""
    if device != "cpu":
        raise SystemExit("bench_quant measures the CPU packed kernels only")
    return measure(suite == "quick", list(CONFIGS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1, 16 new tokens, 1 repeat")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument(
        "--interleaved", action="store_true", help="one process, configurations timed in turn (no peak RSS)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    batches, new_tokens, repeats = ([1], 16, 1) if args.quick else ([1, 8], 128, 3)
    if args.child:
        child(args.child, batches, new_tokens, repeats)
        return
    configs = args.configs.split(",")
    unknown = [c for c in configs if parse_config(c) is None]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; names look like {', '.join(CONFIGS)}")
    threads = setup()
    if args.interleaved:
        rows = measure_interleaved(configs, batches, new_tokens, repeats)
    else:
        rows = measure(args.quick, configs)
    mode = ", interleaved in one process" if args.interleaved else ""
    print(
        f"# bench_quant: {machine_description()} ({threads} threads), new tokens {new_tokens}, "
        f"repeats {repeats}{mode}"
    )
    print_rows(rows)


if __name__ == "__main__":
    main()
