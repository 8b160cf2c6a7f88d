"""`optimum-atb demo`: a few chat prompts through stock transformers and the plugin, side by side.

The rows run one after another in one process on the same model, converted in place after the stock
row (the int8 row on its own copy), so "peak RSS" is this process's resident memory while that row
generated and "weights" the bytes of the row's model (plus its draft). Each row is warmed up once before
it is timed; for the compiled row the warm-up is where the decode step is compiled (printed, not timed).
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass, field

import torch

from ._common import PeakRss, chat_inputs, load_model, weight_bytes

PROMPTS = (
    "What is the capital of France?",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for staying focused while studying.",
)
INDENT = "    "


@dataclass
class Row:
    """One configuration of the table."""

    name: str
    models: tuple = ()
    gen_kwargs: dict = field(default_factory=dict)
    unavailable: str | None = None
    tokens: list = field(default_factory=list)  # new token ids, one list per prompt
    seconds: float = 0.0
    peak_rss: int = 0
    drafted: list = field(default_factory=lambda: [0, 0])  # speculative: accepted, proposed draft tokens
    compiled: bool = False  # to_atb(compile=True): warm up at full length


def _try(what: str, fn):
    """(fn(), None), or (None, why `what` cannot run here) for a plugin feature."""
    import optimum_atb

    try:
        return fn(), None
    except NotImplementedError:
        return None, f"{what}: not available in this build"
    except optimum_atb.OptimumAtbError as exc:
        return None, f"{what}: {str(exc).splitlines()[0]}"


def _streamer(tokenizer):
    from transformers import TextStreamer

    class Indented(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            super().on_finalized_text(text.replace("\n", "\n" + INDENT), stream_end)

    return Indented(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _generate(model, tokenizer, inputs: dict, max_new_tokens: int, streamer=None, **gen_kwargs) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            **gen_kwargs,
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def _run_row(row: Row, model, tokenizer, texts, prompts: list[dict], max_new_tokens: int) -> None:
    """Warm up once, then answer every prompt, streamed; fills tokens, seconds and peak_rss."""
    print(f"== {row.name}", flush=True)
    if row.compiled:  # the longest prompt at full length: the static cache never grows (no recompile)
        print(f"{INDENT}(compiling the decode step, not timed ...)", flush=True)
        t0 = time.perf_counter()
        longest = max(prompts, key=lambda p: p["input_ids"].shape[1])
        _generate(model, tokenizer, longest, max_new_tokens, **row.gen_kwargs)
        print(f"{INDENT}(compiled in {time.perf_counter() - t0:.0f} s)", flush=True)
    else:
        _generate(model, tokenizer, prompts[0], 4, **row.gen_kwargs)
    with PeakRss() as rss:
        for text, inputs in zip(texts, prompts):
            print(f"  > {text}\n{INDENT}", end="", flush=True)
            t0 = time.perf_counter()
            row.tokens.append(
                _generate(model, tokenizer, inputs, max_new_tokens, _streamer(tokenizer), **row.gen_kwargs)
            )
            row.seconds += time.perf_counter() - t0
            stats = getattr(model, "atb_speculative_stats", None) if row.gen_kwargs else None
            if stats is not None:
                row.drafted[0] += stats.accepted_tokens
                row.drafted[1] += stats.proposed_tokens
    row.peak_rss = rss.peak


def table(rows: list[Row]) -> str:
    """The side-by-side Markdown table; the first row is the reference."""
    base = rows[0]
    base_speed = sum(map(len, base.tokens)) / base.seconds
    lines = [
        "| configuration | tokens/s | speedup | peak RSS (MB) | weights (MB) | tokens identical to stock |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.unavailable:
            lines.append(f"| {r.name} | {r.unavailable} | | | | |")
            continue
        speed = sum(map(len, r.tokens)) / r.seconds
        same = sum(a == b for a, b in zip(r.tokens, base.tokens))
        verdict = "yes" if same == len(base.tokens) else f"no ({same}/{len(base.tokens)} prompts)"
        lines.append(
            f"| {r.name} | {speed:.1f} | {speed / base_speed:.2f}x | {r.peak_rss / 2**20:.0f} "
            f"| {weight_bytes(*r.models) / 2**20:.0f} | {'reference' if r is base else verdict} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the demo: stock, to_atb(), to_atb() with the int4 self-draft, to_atb(quantize="int8",
    compile=True); print the table."""
    import optimum_atb

    model, tokenizer, description = load_model(args.model, args.gguf, args.dtype)
    texts = PROMPTS[:1] if args.quick else PROMPTS
    max_new = args.max_new_tokens or (16 if args.quick else 48)
    prompts = [chat_inputs(tokenizer, t, chat=bool(tokenizer.chat_template)) for t in texts]

    # The draft is made from the stock weights, before to_atb() converts the model in place.
    draft, draft_missing = _try("draft_from", lambda: optimum_atb.draft_from(model, quantize="int4"))
    rows = [
        Row("stock transformers", models=(model,)),
        Row("to_atb()", models=(model,)),
        Row("to_atb() + int4 self-draft", models=(model, draft) if draft is not None else (model,)),
        Row('to_atb(quantize="int8", compile=True)', compiled=True),
    ]
    _run_row(rows[0], model, tokenizer, texts, prompts, max_new)
    # A copy of the stock model, made after the stock row so that row's peak RSS does not count it.
    fast, rows[3].unavailable = _try(
        "to_atb", lambda: copy.deepcopy(model).to_atb(quantize="int8", compile=True)
    )
    rows[3].models = (fast,)
    _, rows[1].unavailable = _try("to_atb", model.to_atb)
    rows[2].unavailable = draft_missing or rows[1].unavailable
    rows[2].gen_kwargs = {"assistant_model": draft}
    for row in rows[1:]:
        if row.unavailable is None:
            _run_row(row, row.models[0], tokenizer, texts, prompts, max_new)
        else:
            print(f"== {row.name}: {row.unavailable}", flush=True)
    print(f"\n{description}; {args.dtype}; greedy, up to {max_new} new tokens per prompt; "
          f"{len(texts)} prompt(s); torch {torch.__version__}, {torch.get_num_threads()} threads\n")  # fmt: skip
    print(table(rows))
    accepted, proposed = rows[2].drafted
    if proposed:
        print(
            f"\nint4 self-draft: {accepted} of {proposed} draft tokens accepted ({accepted / proposed:.0%})"
        )
    print(
        "int8 weights (output projection too) compute in bf16: a measured, opt-in loss (docs/quantization.md)"
    )
    return 0
