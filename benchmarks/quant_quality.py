"""Quality of quantized SmolLM2-135M against its float32 model, and where int8's loss comes from.

Part 1, per configuration (stock bf16, int8 per channel, int8 per group of 32, int4 per group of 32 and
64, the GGUF's Q4_1 kept): teacher-forced on the first 512 tokens of tests/data/public_domain_text.txt,
perplexity, next-token agreement, agreement on decisive positions (the fp32 top token leads by >= 0.5 and
>= 1 logit), mean KL divergence (`optimum_atb.quantization.evaluate`), and greedy agreement over 5 prompts x
64 tokens: position-wise, and along fp32's greedy path (each token predicted from fp32's own earlier
tokens, `continuation_logits`), where one near-tie flip does not change the rest of its row.

Part 2, int8 per channel in isolation: the weights of one kind of linear layer at a time are replaced by
their int8 dequantization and the model runs in float32 (so only the weight rounding differs), with the
relative weight error beside the one round-to-nearest gives for Gaussian weights of the same shape.

Part 3, whether a better rounding onto the same grid closes the gap: GPTQ (Frantar et al., 2022) of every
linear onto the per-channel int8 grid `quantize` uses, with Hessians from the text's held-out tokens (512
on), float32 activations, against round-to-nearest; greedy agreement included.

Part 4, what int4's figures owe to the reference: its weights are a dequantized Q4_1 file, so they lie on a
4-bit grid per 32 input columns that int4 groups of 32 nearly reproduce. The same int4 rounding with the
groups shifted off that grid by 8 or 16 columns (decoder linears, float32 activations) shows what int4
round-to-nearest costs on weights that are not already on such a grid.

    python benchmarks/quant_quality.py [--threads N] [--formats-only]   # --formats-only: part 1 alone
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import optimum_atb  # noqa: E402
from optimum_atb.quantization import evaluate  # noqa: E402
from optimum_atb.quantization.formats import dequantize, quantize_int4, quantize_int8  # noqa: E402
from optimum_atb.quantization.quality import (  # noqa: E402
    compare_logits,
    continuation_logits,
    greedy_continuations,
    next_token_logits,
    next_token_targets,
    top2_margin,
)

TEXT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "public_domain_text.txt")
PROMPTS = [  # the quality test's prompts (tests/quantization/test_quality.py)
    "The history of the printing press begins in the fifteenth century, when",
    "Photosynthesis is the process by which green plants",
    "Once upon a time, in a small village at the edge of a great forest,",
    "To install the package, open a terminal and",
    "The three laws of thermodynamics can be summarised as follows.",
]
NEW_TOKENS = 64
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def configurations(model):
    yield "stock bf16", copy.deepcopy(model).to(torch.bfloat16)
    yield "int8 per channel", optimum_atb.quantize(copy.deepcopy(model), bits=8)
    yield "int8 per group of 32", optimum_atb.quantize(copy.deepcopy(model), bits=8, group_size=32)
    for group in (32, 64):  # 128 does not divide SmolLM2's 576 input features
        yield f"int4 group {group}", optimum_atb.quantize(copy.deepcopy(model), bits=4, group_size=group)
    yield "GGUF Q4_1 kept", optimum_atb.load_gguf(harness.smollm2_dir(), harness.GGUF_FILE)


def int8_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """`w` rounded to per-channel int8 and back to float32."""
    q, s = quantize_int8(w)
    return dequantize(q, s, None, 8, None, torch.float32)


def gaussian_int8_error(shape: torch.Size) -> float:
    """Relative error of per-channel int8 round-to-nearest on Gaussian weights of `shape`."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return ((int8_roundtrip(w) - w).norm() / w.norm()).item()


def int4_roundtrip_shifted(w: torch.Tensor, group_size: int, shift: int) -> torch.Tensor:
    """`w` rounded to int4 in groups of `group_size` columns that start `shift` columns later (the last
    group wraps around to the first columns), back to float32."""
    rolled = torch.roll(w, -shift, dims=1)
    return torch.roll(
        dequantize(*quantize_int4(rolled, group_size), 4, group_size, torch.float32), shift, dims=1
    )


def input_hessians(model, linears: dict, ids: torch.Tensor) -> dict:
    """X^T X / rows of every linear's input over `ids` (float64), from the float model's own forward."""
    hessians = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in linears.items()}
    rows = {n: 0 for n in linears}

    def hook(name):
        def record(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            hessians[name] += x.T @ x
            rows[name] += x.shape[0]

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    with torch.no_grad():
        for start in range(0, ids.shape[1], 512):
            model(ids[:, start : start + 512])
    for h in handles:
        h.remove()
    return {n: h / rows[n] for n, h in hessians.items()}


def gptq_int8(w: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """`w` rounded column by column onto its per-channel int8 grid, each column's rounding error spread
    over the columns not yet rounded through the inverse Hessian's Cholesky factor (GPTQ); returns the
    dequantized float32 weight."""
    w = w.double().clone()
    _, scale = quantize_int8(w)
    scale = scale.double()[:, None]
    h = hessian + damp * hessian.diagonal().mean() * torch.eye(w.shape[1], dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.empty_like(w)
    for b0 in range(0, w.shape[1], block):
        b1 = min(b0 + block, w.shape[1])
        err = torch.empty(w.shape[0], b1 - b0, dtype=torch.float64)
        for j in range(b0, b1):
            out[:, j : j + 1] = (w[:, j : j + 1] / scale).round().clamp(-127, 127) * scale
            err[:, j - b0] = (w[:, j] - out[:, j]) / u[j, j]
            w[:, j:b1] -= err[:, j - b0 : j - b0 + 1] * u[j, j:b1]
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return out.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--formats-only", action="store_true", help="part 1 only: the table per format")
    args = parser.parse_args()
    threads = harness.setup(args.threads)
    print(f"# quant_quality\n{harness.machine_description()}; threads={threads}\n")
    model, tok = harness.load_smollm2(torch.float32)
    with open(TEXT) as f:
        all_ids = tok(f.read(), return_tensors="pt")["input_ids"]
    ids = all_ids[:, :512]
    ref = next_token_logits(model, ids)
    ref_tokens = greedy_continuations(model, tok, PROMPTS, NEW_TOKENS)
    ref_path = continuation_logits(model, tok, PROMPTS, ref_tokens)
    path_targets = ref_tokens.reshape(-1)

    targets = next_token_targets(ids)
    fp32_ppl = compare_logits(ref, ref, targets).perplexity  # from the logits already computed
    print(f"| model | perplexity (fp32 {fp32_ppl:.2f}) | next-token agreement | agreement where fp32's top-2 "
          "margin >= 0.5 / >= 1.0 logit | mean KL | greedy agreement | along fp32's greedy path (where "
          "margin >= 1.0) | KL on that path |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, quantized in configurations(model):
        logits = next_token_logits(quantized, ids)
        r = compare_logits(logits, ref, targets, margin=1.0)
        half = compare_logits(logits, ref, targets, margin=0.5)
        agree = (
            (greedy_continuations(quantized, tok, PROMPTS, NEW_TOKENS) == ref_tokens).double().mean().item()
        )
        path = compare_logits(
            continuation_logits(quantized, tok, PROMPTS, ref_tokens), ref_path, path_targets
        )
        print(f"| {name} | {r.perplexity:.2f} ({r.perplexity_change:+.1%}) | {r.next_token_agreement:.1%} "
              f"| {half.decisive_agreement:.1%} of {half.decisive_share:.0%} / {r.decisive_agreement:.1%} of "
              f"{r.decisive_share:.0%} | {r.mean_kl:.4f} | {agree:.0%} | {path.next_token_agreement:.1%} "
              f"({path.decisive_agreement:.0%} of {path.decisive_share:.0%}) | {path.mean_kl:.4f} |")  # fmt: skip
        del quantized

    gap = top2_margin(ref)
    print(f"\nfp32 top-2 margin: < 0.1 logit at {(gap < 0.1).double().mean():.1%} of positions, "
          f"< 0.5 at {(gap < 0.5).double().mean():.1%}, < 1.0 at {(gap < 1.0).double().mean():.1%}\n")  # fmt: skip
    if args.formats_only:
        return

    # untie the output projection: rounding it must leave the input embeddings in float, as quantize() does
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    original = {n: m.weight.data for n, m in linears.items()}
    fake = {n: int8_roundtrip(w) for n, w in original.items()}

    @contextlib.contextmanager
    def weights_from(replacement: dict, names: list[str]):
        """`names`' weights taken from `replacement` inside the block, the rest float32."""
        for n in names:
            linears[n].weight.data = replacement[n]
        try:
            yield
        finally:
            for n in names:
                linears[n].weight.data = original[n]

    def with_weights(replacement: dict, names: list[str]) -> str:
        """Agreement figures with `names`' weights taken from `replacement`, the rest float32."""
        with weights_from(replacement, names):
            r = evaluate(model, ref, ids, margin=0.5)
        return f"{r.next_token_agreement:.1%} | {r.decisive_agreement:.1%} | {r.mean_kl:.4f}"

    def error(replacement: dict, names: list[str]) -> float:
        return sum(((replacement[n] - original[n]).norm() / original[n].norm()).item() for n in names) / len(
            names
        )

    print("Weights rounded, float32 activations (the weight rounding alone):\n")
    print("| layers rounded | relative weight error (int8 of Gaussian weights, same shape) | next-token agreement | margin >= 0.5 | mean KL |")  # fmt: skip
    print("|---|---|---|---|---|")
    for kind in KINDS:
        names = [n for n in linears if n.endswith(kind)]
        gauss = gaussian_int8_error(original[names[0]].shape)
        print(
            f"| {kind} ({len(names)}), int8 | {error(fake, names):.2%} ({gauss:.2%}) | {with_weights(fake, names)} |"
        )
    every = list(linears)
    figures = {"round-to-nearest": with_weights(fake, every)}
    print(f"| all ({len(every)}), int8 | {error(fake, every):.2%} | {figures['round-to-nearest']} |")
    bf16 = {n: w.to(torch.bfloat16).float() for n, w in original.items()}
    print(f"| all ({len(every)}), bf16 | {error(bf16, every):.2%} | {with_weights(bf16, every)} |")

    print("\nRounding onto the per-channel int8 grid, float32 activations: round-to-nearest against GPTQ "
          f"(Hessians from tokens 512-{all_ids.shape[1]} of the text):\n")  # fmt: skip
    print(
        "| rounding | relative weight error | next-token agreement | margin >= 0.5 | mean KL | greedy agreement |"
    )
    print("|---|---|---|---|---|---|")
    hessians = input_hessians(model, linears, all_ids[:, 512:])
    gptq = {n: gptq_int8(w, hessians[n]) for n, w in original.items()}
    figures["GPTQ"] = with_weights(gptq, every)
    for name, replacement in (("round-to-nearest", fake), ("GPTQ", gptq)):
        with weights_from(replacement, every):
            agree = (
                (greedy_continuations(model, tok, PROMPTS, NEW_TOKENS) == ref_tokens).double().mean().item()
            )
        print(f"| {name} | {error(replacement, every):.2%} | {figures[name]} | {agree:.0%} |")

    print(
        "\nint4 round-to-nearest of the decoder linears, float32 activations, groups on and off the file's grid:\n"
    )
    print("| groups | relative weight error | perplexity | next-token agreement | mean KL |")
    print("|---|---|---|---|---|")
    decoder = [n for n in every if n != "lm_head"]
    for group, shift in ((32, 0), (32, 8), (32, 16), (64, 0)):
        rounded = {n: int4_roundtrip_shifted(original[n], group, shift) for n in decoder}
        with weights_from(rounded, decoder):
            r = evaluate(model, ref, ids)
        where = "on the grid" if shift == 0 else f"shifted by {shift} columns"
        print(f"| {group} columns, {where} | {error(rounded, decoder):.2%} | {r.perplexity:.2f} "
              f"({r.perplexity_change:+.1%}) | {r.next_token_agreement:.1%} | {r.mean_kl:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
