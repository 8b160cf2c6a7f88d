"""GPU benchmark of the Triton attention kernels against PyTorch's own paths (needs a CUDA GPU).

* prefill: B=4, S=2048, Hq=32, Hkv=8, D=128, bf16, causal: ``optimum_atb.ops.flash_attention`` (triton) vs
  ``F.scaled_dot_product_attention`` restricted to the flash backend (K/V repeated to Hq beforehand, outside
  the timing, as the flash backend needs equal head counts), in TFLOP/s (causal FLOPs: 2 * 2 * B * Hq * S^2
  * D / 2).
* paged decode: B=64, context 4096, block size 16 and 128, same heads: ``ops.paged_attention`` (triton) vs
  gather-from-the-pool + SDPA, as achieved bandwidth over the K/V bytes (GB/s) and as a fraction of a
  measured device-to-device copy bandwidth.
* weight-only quantized matmul (W8A16 per channel, W4A16 groups of 32), a LLaMA-7B MLP shape (N=11008,
  K=4096), bf16 activations, at 1 and 16 rows (decode: GB/s of weight bytes read, and of copy bandwidth)
  and 2048 rows (prefill: TFLOP/s): the Triton kernel vs cuBLAS on the bf16 weight (``F.linear``).

Every case is first checked against the torch path at the same sizes; timings are medians of
``triton.testing.do_bench``. Results are printed as Markdown and written as JSON.

    python benchmarks/bench_kernels_gpu.py [--json results.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

PREFILL = dict(batch=4, seqlen=2048, hq=32, hkv=8, head_dim=128)
DECODE = dict(batch=64, context=4096, hq=32, hkv=8, head_dim=128)
QUANT_MATMUL = dict(n=11008, k=4096)
QUANT_FORMATS = ((8, None), (4, 32))
QUANT_ROWS = (1, 16, 2048)


def _bench(fn) -> float:
    """Median milliseconds of `fn` (triton.testing.do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def _check(name: str, got: torch.Tensor, want: torch.Tensor, atol: float) -> float:
    err = (got.float() - want.float()).abs().max().item()
    if not err <= atol:
        raise SystemExit(
            f"{name}: max abs difference {err:.4g} > {atol} against the torch path; not timing it"
        )
    return err


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), 1 GiB buffers."""
    src = torch.randn(256 * 1024 * 1024, device="cuda")
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def bench_prefill(batch: int, seqlen: int, hq: int, hkv: int, head_dim: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from optimum_atb import ops, use_backend

    dt = torch.bfloat16
    q = torch.randn(batch, seqlen, hq, head_dim, device="cuda", dtype=dt)
    k = torch.randn(batch, seqlen, hkv, head_dim, device="cuda", dtype=dt)
    v = torch.randn(batch, seqlen, hkv, head_dim, device="cuda", dtype=dt)
    qt = q.transpose(1, 2)
    kt = k.transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
    vt = v.transpose(1, 2).repeat_interleave(hq // hkv, dim=1)

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

    def triton_attention():
        with use_backend("triton"):
            return ops.flash_attention(q, k, v, causal=True)

    err = _check("prefill", triton_attention(), sdpa().transpose(1, 2), atol=3e-2)
    flops = 4 * batch * hq * seqlen * seqlen * head_dim / 2
    ms_sdpa, ms_triton = _bench(sdpa), _bench(triton_attention)
    return {
        "case": f"prefill B={batch} S={seqlen} Hq={hq} Hkv={hkv} D={head_dim} bf16 causal",
        "baseline": "SDPA flash backend",
        "baseline_ms": ms_sdpa,
        "triton_ms": ms_triton,
        "baseline_tflops": flops / ms_sdpa / 1e9,
        "triton_tflops": flops / ms_triton / 1e9,
        "max_abs_diff": err,
    }


def bench_decode(
    batch: int, context: int, hq: int, hkv: int, head_dim: int, block_size: int, copy_gbs: float
):
    from optimum_atb import ops, use_backend

    dt = torch.bfloat16
    blocks_per_seq = context // block_size
    num_blocks = batch * blocks_per_seq
    k_cache = torch.randn(num_blocks, block_size, hkv, head_dim, device="cuda", dtype=dt)
    v_cache = torch.randn(num_blocks, block_size, hkv, head_dim, device="cuda", dtype=dt)
    tables = torch.randperm(num_blocks, device="cuda").view(batch, blocks_per_seq).to(torch.int32)
    lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, 1, hq, head_dim, device="cuda", dtype=dt)

    def gather_sdpa():
        keys = k_cache[tables.long()].reshape(batch, context, hkv, head_dim).transpose(1, 2)
        values = v_cache[tables.long()].reshape(batch, context, hkv, head_dim).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, enable_gqa=True
        )
        return out.transpose(1, 2)

    def triton_paged():
        with use_backend("triton"):
            return ops.paged_attention(q, k_cache, v_cache, tables, lens)

    err = _check(f"decode block {block_size}", triton_paged(), gather_sdpa(), atol=2e-2)
    kv_bytes = 2 * batch * context * hkv * head_dim * k_cache.element_size()
    ms_base, ms_triton = _bench(gather_sdpa), _bench(triton_paged)
    return {
        "case": f"paged decode B={batch} ctx={context} block={block_size} Hq={hq} Hkv={hkv} D={head_dim} bf16",
        "baseline": "gather + SDPA",
        "baseline_ms": ms_base,
        "triton_ms": ms_triton,
        "baseline_gbs": kv_bytes / ms_base / 1e6,
        "triton_gbs": kv_bytes / ms_triton / 1e6,
        "triton_fraction_of_copy": kv_bytes / ms_triton / 1e6 / copy_gbs,
        "max_abs_diff": err,
    }


def bench_quant_matmul(rows: int, n: int, k: int, bits: int, group_size: int | None, copy_gbs: float) -> dict:
    from optimum_atb import use_backend
    from optimum_atb.quantization import QuantLinear

    dt = torch.bfloat16
    linear = torch.nn.Linear(k, n, bias=False, device="cuda")
    layer = QuantLinear.from_linear(linear, bits, group_size)
    weight = layer.dequantized_weight(dt)  # the same weights, for cuBLAS
    x = torch.randn(rows, k, device="cuda", dtype=dt)

    def cublas():
        return torch.nn.functional.linear(x, weight)

    def triton_quant():
        with use_backend("triton"):
            return layer(x)

    want = cublas()
    err = _check(f"W{bits}A16 rows={rows}", triton_quant(), want, atol=2e-2 * want.abs().max().item())
    ms_base, ms_triton = _bench(cublas), _bench(triton_quant)
    fmt = f"W{bits}A16" + ("" if group_size is None else f" g{group_size}")
    case = f"{fmt} matmul M={rows} N={n} K={k} bf16"
    row = {"case": case, "baseline": "cuBLAS bf16 weight", "baseline_ms": ms_base, "triton_ms": ms_triton,
           "max_abs_diff": err}  # fmt: skip
    if rows > 16:
        flops = 2 * rows * n * k
        row.update(baseline_tflops=flops / ms_base / 1e9, triton_tflops=flops / ms_triton / 1e9)
    else:  # bandwidth of the bytes each kernel must read: its own weights (and scales)
        base_bytes = weight.numel() * weight.element_size()
        quant_bytes = sum(t.numel() * t.element_size() for t in layer.buffers())
        row.update(
            baseline_gbs=base_bytes / ms_base / 1e6,
            triton_gbs=quant_bytes / ms_triton / 1e6,
            triton_fraction_of_copy=quant_bytes / ms_triton / 1e6 / copy_gbs,
        )
    return row


def markdown(results: dict) -> str:
    lines = [f"GPU: {results['gpu']}, torch {results['torch']}, triton {results['triton']}", ""]
    lines.append(f"Device-to-device copy: {results['copy_gbs']:.0f} GB/s")
    lines += ["", "| case | baseline | baseline result | triton result | speed-up | of copy bw |"]
    lines.append("|---|---|---|---|---|---|")
    for r in results["rows"]:
        unit = "tflops" if "triton_tflops" in r else "gbs"
        label = "TFLOP/s" if unit == "tflops" else "GB/s"
        frac = r.get("triton_fraction_of_copy")
        lines.append(
            f"| {r['case']} | {r['baseline']} | {r['baseline_ms']:.3f} ms, {r['baseline_' + unit]:.1f} {label} "
            f"| {r['triton_ms']:.3f} ms, {r['triton_' + unit]:.1f} {label} | {r['baseline_ms'] / r['triton_ms']:.2f}x "
            f"| {'-' if frac is None else f'{frac:.0%}'} |"
        )
    return "\n".join(lines)


def measure(quick: bool) -> dict:
    """Check, then time, every case; the results dict that `markdown` and the JSON file take."""
    if not torch.cuda.is_available():
        sys.exit("bench_kernels_gpu.py needs a CUDA GPU (none is visible); nothing was measured.")
    import triton

    prefill, decode = dict(PREFILL), dict(DECODE)
    if quick:
        prefill.update(seqlen=512)
        decode.update(batch=16, context=1024)
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth_gbs()
    rows = [bench_prefill(**prefill)]
    rows += [bench_decode(**decode, block_size=bs, copy_gbs=copy_gbs) for bs in (16, 128)]
    rows += [
        bench_quant_matmul(m, **QUANT_MATMUL, bits=bits, group_size=group, copy_gbs=copy_gbs)
        for bits, group in QUANT_FORMATS
        for m in (QUANT_ROWS[:2] if quick else QUANT_ROWS)
    ]
    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_gbs": copy_gbs,
        "rows": rows,
    }


def run(suite: str = "quick", device: str = "cuda") -> list:
    """The matrix entry point (``benchmarks/run_all.py``): one row per case, triton against its baseline,
    in TFLOP/s (prefill) or GB/s (paged decode)."""
    if device != "cuda":
        raise SystemExit("bench_kernels_gpu measures the Triton kernels on a CUDA GPU (--device cuda)")
    from harness import Row

    results = measure(quick=suite == "quick")
    out = []
    for r in results["rows"]:
        unit = "tflops" if "triton_tflops" in r else "gbs"
        out.append(
            Row(
                benchmark="kernels-gpu",
                config=f"triton {r['case']}",
                baseline=r["baseline"],
                baseline_value=r[f"baseline_{unit}"],
                value=r[f"triton_{unit}"],
                unit="TFLOP/s" if unit == "tflops" else "GB/s",
                extra={"gpu": results["gpu"], "max_abs_diff": r["max_abs_diff"]},
            )
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="bench_kernels_gpu.json", help="where to write the JSON results")
    parser.add_argument("--quick", action="store_true", help="quarter-size shapes (a smoke run)")
    args = parser.parse_args(argv)
    results = measure(args.quick)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    print(markdown(results))


if __name__ == "__main__":
    main()
