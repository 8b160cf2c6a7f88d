"""Speculative decoding against plain stock greedy decoding on SmolLM2-135M (see benchmarking.md).

Per target dtype (fp32, bf16) and prompt kind (text continuation, chat template), batch 1:
  plain stock greedy | int4 self-draft (optimum_atb.draft_from) | our n-gram lookup | stock prompt lookup;
and batch 4 with the int4 self-draft against stock batch-4 greedy (``--batch4-only``: those rows alone).
The speculative rows run the way the plugin is used: the target converted with ``to_atb()``, then
``generate(assistant_model=...)``; the row "to_atb() greedy" gives the converted target alone, so the share
of the speed-up due to speculation shows.
The full run adds the compiled form: target ``to_atb(compile=True)``, draft ``draft_from(..., compile=True)``
(verify and draft steps through torch.compile; the warm-up run compiles them), and that target alone.
Acceptance (accepted / proposed draft tokens) and tokens per target forward are printed beside every
speculative figure. ``--quick``: fp32 only, 48 new tokens, one timed run (a smoke test, not a result).

    python benchmarks/bench_speculative.py [--quick] [--batch4-only] [--dtypes float32] [--threads N] [--new-tokens N]

Each row is also printed to stderr as soon as it is measured (a full run takes 25-100 min on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import optimum_atb  # noqa: E402


def measure(model, inputs, new_tokens, repeats, **gen_kwargs):
    """(tokens/s, stats of the last run or None)."""
    model.__dict__.pop("atb_speculative_stats", None)
    timing = harness.time_generate(model, inputs, new_tokens, repeats=repeats, **gen_kwargs)
    return timing.tokens_per_s, getattr(model, "atb_speculative_stats", None)


def bench_dtype(dtype, kinds, new_tokens, repeats, batch4: bool, compiled: bool):
    model, tok = harness.load_smollm2(dtype)
    draft = optimum_atb.draft_from(model, quantize="int4")
    target = copy.deepcopy(model).to_atb()  # attaches the speculative decoder
    if compiled:  # verify and draft steps through torch.compile (warm-up runs compile them)
        ctarget = copy.deepcopy(model).to_atb(compile=True)
        cdraft = optimum_atb.draft_from(ctarget, quantize="int4", compile=True)
    results = []

    def add(name, config, base_name, base, value, stats):
        row = harness.Row(name, config, base_name, base, value)
        if stats is not None:
            row.extra = {
                "acceptance": stats.acceptance_rate,
                "tokens_per_forward": stats.tokens_per_target_forward,
            }
        results.append(row)
        print("measured:", format_row(row), file=sys.stderr, flush=True)  # a full run takes 25-100 min

    dname = str(dtype).replace("torch.", "")
    for kind in kinds:
        inputs = harness.make_inputs(tok, 1, kind=kind)
        plain, _ = measure(model, inputs, new_tokens, repeats)
        stock_lookup, _ = measure(model, inputs, new_tokens, repeats, prompt_lookup_num_tokens=10)
        converted, _ = measure(target, inputs, new_tokens, repeats)
        add(f"{dname} b1 {kind}", "to_atb() greedy", "stock greedy", plain, converted, None)
        spec, stats = measure(target, inputs, new_tokens, repeats, assistant_model=draft)
        add(f"{dname} b1 {kind}", "int4 self-draft", "stock greedy", plain, spec, stats)
        if compiled:
            alone, _ = measure(ctarget, inputs, new_tokens, repeats)
            add(f"{dname} b1 {kind}", "to_atb(compile=True) greedy", "stock greedy", plain, alone, None)
            spec, stats = measure(ctarget, inputs, new_tokens, repeats, assistant_model=cdraft)
            add(f"{dname} b1 {kind}", "int4 self-draft, compiled", "stock greedy", plain, spec, stats)
        ngram, stats = measure(target, inputs, new_tokens, repeats, prompt_lookup_num_tokens=10)
        add(f"{dname} b1 {kind}", "n-gram (ours, k<=10)", "stock greedy", plain, ngram, stats)
        add(f"{dname} b1 {kind}", "n-gram (ours, k<=10)", "stock prompt lookup", stock_lookup, ngram, stats)
    if batch4:
        inputs = harness.make_inputs(tok, 4, kind="text")
        plain, _ = measure(model, inputs, new_tokens, repeats)
        spec, stats = measure(target, inputs, new_tokens, repeats, assistant_model=draft)
        add(f"{dname} b4 text", "int4 self-draft", "stock greedy", plain, spec, stats)
        if compiled:
            alone, _ = measure(ctarget, inputs, new_tokens, repeats)
            add(f"{dname} b4 text", "to_atb(compile=True) greedy", "stock greedy", plain, alone, None)
            spec, stats = measure(ctarget, inputs, new_tokens, repeats, assistant_model=cdraft)
            add(f"{dname} b4 text", "int4 self-draft, compiled", "stock greedy", plain, spec, stats)
    return results


def format_row(r: harness.Row) -> str:
    """One markdown table row of the results (acceptance and tokens per target forward where drafted)."""
    acc = r.extra.get("acceptance", float("nan"))
    tpf = r.extra.get("tokens_per_forward", float("nan"))
    return (
        f"| {r.benchmark} | {r.config} | {r.baseline} | {r.baseline_value:.1f} | {r.value:.1f} "
        f"| {r.ratio:.2f}x | {acc:.2f} | {tpf:.2f} |"
    )


def run(
    suite: str = "quick",
    device: str = "cpu",
    new_tokens: int | None = None,
    batch4_only: bool = False,
    dtypes: list[torch.dtype] | None = None,
) -> list[harness.Row]:
    """The matrix entry point (``benchmarks/run_all.py``): quick = fp32, 48 tokens, 1 run; full = fp32
    and bf16, 128 tokens, median of 3. ``batch4_only``: the fp32 batch-4 rows alone; ``dtypes``: these target
    dtypes instead of the suite's (batch-4 rows come with float32 only)."""
    if device != "cpu":
        raise SystemExit("bench_speculative measures on the CPU only")
    quick = suite == "quick"
    new_tokens = new_tokens or (48 if quick else 128)
    repeats = 1 if quick else 3
    if dtypes is None:
        dtypes = [torch.float32] if quick or batch4_only else [torch.float32, torch.bfloat16]
    kinds = [] if batch4_only else ["text", "chat"]
    rows = []
    for dtype in dtypes:
        rows += bench_dtype(
            dtype, kinds, new_tokens, repeats, batch4=dtype == torch.float32, compiled=not quick
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short smoke version (fp32, 48 tokens, 1 run)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--batch4-only", action="store_true", help="only the fp32 batch-4 rows")
    parser.add_argument(
        "--dtypes", default=None, help="target dtypes, e.g. float32 (default: float32,bfloat16)"
    )
    args = parser.parse_args()
    threads = harness.setup(args.threads)
    quick = args.quick
    new_tokens = args.new_tokens or (48 if quick else 128)
    print(f"# bench_speculative{' --quick (smoke test, not a result)' if quick else ''}")
    print(
        f"{harness.machine_description()}; threads={threads}; new tokens={new_tokens}; repeats={1 if quick else 3}\n"
    )
    dtypes = None
    if args.dtypes:
        names = args.dtypes.split(",")
        unknown = [n for n in names if n not in ("float32", "bfloat16")]
        if unknown:
            parser.error(f"unknown dtype(s) {unknown}; use float32 and/or bfloat16")
        dtypes = [getattr(torch, n) for n in names]
    rows = run("quick" if quick else "full", "cpu", new_tokens, batch4_only=args.batch4_only, dtypes=dtypes)
    print(
        "| benchmark | config | baseline | baseline tok/s | tok/s | ratio | acceptance | tokens/target fwd |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(format_row(r))


if __name__ == "__main__":
    main()
