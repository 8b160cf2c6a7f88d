"""The benchmark matrix: every ``benchmarks/bench_*.py`` plus a decode-latency sweep over context length.

Contract with the benchmark scripts: each defines ``run(suite: str, device: str) -> list[harness.Row]``
(suite "quick" or "full", device "cpu" or "cuda"); every row compares a plugin configuration with stock
transformers measured in the same run. Rows meant for the latency plot carry ``extra["context_len"]``.
A script that lacks ``run``, exits (``SystemExit``, e.g. "no GPU") or fails is recorded as skipped or
failed, and the others still run.

Usage: ``optimum-atb bench [--suite quick|full] [--device cpu|cuda] [--out DIR]`` or
``python benchmarks/run_all.py`` with the same options. Writes results.json, results.md and PNG plots.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import inspect
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import harness  # noqa: E402  (sibling module; this folder is not an installed package)

SUITES = ("quick", "full")
DEVICES = ("cpu", "cuda")
SWEEP = {"quick": ((128, 512), 16), "full": ((128, 512, 1024, 2048), 64)}  # context lengths, decode steps


def discover(folder: Path = HERE) -> list[Path]:
    """The benchmark scripts of the matrix, in name order."""
    return sorted(p for p in folder.glob("bench_*.py") if p.is_file())


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


class Skipped(Exception):
    """A benchmark that does not apply here (no entry point, no GPU, feature not built)."""


def _entry_kwargs(fn, suite: str, device: str) -> dict:
    """Keyword arguments for a script's ``run``; tolerates ``quick: bool`` in place of ``suite``."""
    known = {"suite": suite, "device": device, "quick": suite == "quick"}
    params = inspect.signature(fn).parameters.values()
    kwargs = {p.name: known[p.name] for p in params if p.name in known}
    missing = [
        p.name
        for p in params
        if p.default is p.empty and p.name not in kwargs and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if missing:
        raise Skipped(f"run() needs {missing}; the matrix calls run(suite, device)")
    return kwargs


def _as_dict(row) -> dict:
    if hasattr(row, "as_dict"):
        return row.as_dict()
    if isinstance(row, dict) and {"benchmark", "config", "baseline_value", "value"} <= row.keys():
        base = row["baseline_value"]
        return {
            "unit": "tokens/s",
            "extra": {},
            **row,
            "ratio": row["value"] / base if base else float("nan"),
        }
    raise TypeError(f"not a harness.Row: {row!r}")


def run_one(fn, suite: str, device: str) -> tuple[dict, list[dict]]:
    """Call one benchmark; returns (status record, rows). Never raises for a failing benchmark."""
    t0 = time.perf_counter()
    try:
        rows = [_as_dict(r) for r in fn(**_entry_kwargs(fn, suite, device))]
        status = {"status": "ok", "rows": len(rows)}
    except (Skipped, SystemExit) as exc:
        rows, status = [], {"status": "skipped", "message": str(exc) or type(exc).__name__}
    except NotImplementedError as exc:
        rows, status = [], {"status": "skipped", "message": f"not available in this build {exc}".strip()}
    except Exception as exc:  # one broken benchmark must not lose the others' results
        rows = []
        status = {
            "status": "failed",
            "message": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
    status["seconds"] = round(time.perf_counter() - t0, 1)
    return status, rows


def _decode_ms_per_token(model, ids: torch.Tensor, steps: int) -> float:
    """Median wall time of one greedy decode step after a prefill of `ids` (DynamicCache)."""
    from transformers import DynamicCache

    cuda = ids.device.type == "cuda"
    times = []
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        logits = model(input_ids=ids, cache=cache, use_cache=True).logits
        for _ in range(steps):
            nxt = logits[:, -1:].argmax(-1)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits = model(input_ids=nxt, cache=cache, use_cache=True).logits
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def context_sweep(suite: str, device: str, load=harness.load_smollm2) -> list[harness.Row]:
    """Decode latency of stock vs ``to_atb()`` SmolLM2 (fp32, batch 1) at several context lengths."""
    import optimum_atb

    contexts, steps = SWEEP[suite]
    stock, _ = load()
    stock = stock.to(device)
    atb = optimum_atb.to_atb(copy.deepcopy(stock))
    gen = torch.Generator().manual_seed(0)
    rows = []
    for ctx in contexts:
        ids = torch.randint(100, stock.config.vocab_size, (1, ctx), generator=gen).to(device)
        _decode_ms_per_token(stock, ids[:, :16], 4)  # warm-up
        base = _decode_ms_per_token(stock, ids, steps)
        _decode_ms_per_token(atb, ids[:, :16], 4)
        ms = _decode_ms_per_token(atb, ids, steps)
        rows.append(
            harness.Row(
                "context_sweep",
                "to_atb() fp32 bs1",
                "stock fp32 bs1",
                1000 / base,
                1000 / ms,
                extra={"context_len": ctx, "ms_per_token": ms, "baseline_ms_per_token": base, "steps": steps},
            )  # fmt: skip
        )
    return rows


def to_markdown(results: dict) -> str:
    """results.md: header, one table of every row, then each benchmark's status."""
    lines = [
        f"# optimum-atb benchmarks ({results['suite']} suite, {results['device']})",
        "",
        f"{results['machine']}; started {results['started']}, {results['seconds']:.0f} s in all.",
        "Ratios compare with stock transformers measured in the same run (higher is better).",
        "",
        "| benchmark | config | baseline | baseline value | value | unit | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['benchmark']} | {r['config']} | {r['baseline']} | {r['baseline_value']:.2f} "
            f"| {r['value']:.2f} | {r['unit']} | {r['ratio']:.2f}x |"
        )
    lines += ["", "| script | status | seconds | note |", "|---|---|---|---|"]
    for name, s in results["benchmarks"].items():
        lines.append(
            f"| {name} | {s['status']} | {s['seconds']} | {s.get('message', '').splitlines()[0] if s.get('message') else ''} |"
        )
    return "\n".join(lines) + "\n"


def run(
    suite: str = "quick",
    device: str = "cpu",
    out: str | os.PathLike = "bench-results",
    folder: Path = HERE,
    sweep: bool = True,
) -> dict:
    """Run the matrix with a progress bar, write results.json / results.md / plots under `out`; return results."""
    import plots
    from tqdm import tqdm

    if suite not in SUITES or device not in DEVICES:
        raise ValueError(f"suite must be one of {SUITES} and device one of {DEVICES}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started, t0 = datetime.datetime.now().isoformat(timespec="seconds"), time.perf_counter()
    jobs = [(p.stem, p) for p in discover(folder)] + ([("context_sweep", None)] * sweep)
    statuses, rows = {}, []
    bar = tqdm(jobs, desc=f"bench ({suite}, {device})", unit="benchmark", file=sys.stderr)
    for name, path in bar:
        bar.set_postfix_str(name)
        if path is None:
            fn = context_sweep
        else:
            try:
                fn = getattr(_load(path), "run", None)
            except Exception as exc:
                statuses[name] = {
                    "status": "failed",
                    "message": f"import: {type(exc).__name__}: {exc}",
                    "seconds": 0.0,
                }
                continue
            if not callable(fn):
                statuses[name] = {
                    "status": "skipped",
                    "message": "no run(suite, device) function",
                    "seconds": 0.0,
                }
                continue
        statuses[name], new_rows = run_one(fn, suite, device)
        rows += new_rows
    results = {
        "suite": suite,
        "device": device,
        "machine": harness.machine_description(),
        "threads": torch.get_num_threads(),
        "allocator": {k: os.environ.get(k, "unset") for k in harness.ALLOCATOR_ENV},
        "started": started,
        "seconds": round(time.perf_counter() - t0, 1),
        "benchmarks": statuses,
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(to_markdown(results))
    results["plots"] = [str(p) for p in plots.plot_all(results, out)]
    return results


def summary(results: dict, out) -> str:
    """A few lines for the terminal: where the files are and what failed."""
    counts = {}
    for s in results["benchmarks"].values():
        counts[s["status"]] = counts.get(s["status"], 0) + 1
    lines = [f"{len(results['rows'])} rows; " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))]
    for name, s in results["benchmarks"].items():
        if s["status"] != "ok":
            lines.append(
                f"  {name}: {s['status']}: {s.get('message', '').splitlines()[0] if s.get('message') else ''}"
            )
    lines.append(
        f"wrote {Path(out) / 'results.json'}, {Path(out) / 'results.md'}"
        + "".join(f", {p}" for p in results["plots"])
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=SUITES, default="quick")
    parser.add_argument("--device", choices=DEVICES, default="cpu")
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "run_all.py: error: --device cuda: no CUDA GPU is visible to torch\n")
    harness.setup(args.threads)
    results = run(args.suite, args.device, args.out)
    print(to_markdown(results))
    print(summary(results, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
