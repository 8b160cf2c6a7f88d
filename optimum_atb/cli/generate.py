"""`optimum-atb generate`: one prompt through the plugin (or stock transformers), optionally streamed."""

from __future__ import annotations

import argparse
import os
import time

import torch

from ._common import UsageError, chat_inputs, load_model, resolve_source, say

NGRAM_TOKENS = 10  # prompt_lookup_num_tokens for --draft ngram


def prepare_draft(model, draft: str | None, dtype: str) -> dict:
    """generate() kwargs for --draft: an int4 self-draft, n-gram prompt lookup, or a draft model from a path."""
    if draft is None:
        return {}
    if draft == "ngram":
        return {"prompt_lookup_num_tokens": NGRAM_TOKENS}
    if draft == "int4":
        import optimum_atb

        return {"assistant_model": optimum_atb.draft_from(model, quantize="int4")}
    assistant, _, _ = load_model(draft, None, dtype)
    if assistant.config.vocab_size != model.config.vocab_size:
        raise UsageError(
            f"--draft {draft}: vocabulary of {assistant.config.vocab_size} tokens, the model has "
            f"{model.config.vocab_size}; a draft must share the target's tokenizer"
        )
    return {"assistant_model": assistant}


def convert(model, stock: bool, quantize: str | None, compile: bool = False):
    """Apply the plugin (`to_atb`, with weight quantization and the compiled decode step) or, with
    `stock`, only the quantization."""
    import optimum_atb

    if not stock:
        return model.to_atb(quantize=quantize, compile=compile)
    if quantize is not None:
        optimum_atb.quantize(model, bits=int(quantize[3:]))
    return model


def run(args: argparse.Namespace) -> int:
    """Load, convert, generate greedily and print the answer (timing on stderr)."""
    from transformers import TextStreamer

    if args.stock and args.compile:
        raise UsageError("--compile applies to the plugin's path (to_atb); drop --stock or --compile")
    if args.draft not in (None, "int4", "ngram"):  # a bad draft fails before the target is loaded
        if not os.path.exists(args.draft):
            raise UsageError(
                f"--draft must be int4, ngram or a model folder / .gguf file; not found: {args.draft}"
            )
        resolve_source(args.draft, None)
    model, tokenizer, _ = load_model(args.model, args.gguf, args.dtype)
    gen_kwargs = prepare_draft(model, args.draft, args.dtype)
    model = convert(model, args.stock, args.quantize, args.compile)
    if args.compile:
        say("compiling the decode step on the first generate (about 20-30 s on a 2-core CPU) ...")
    inputs = chat_inputs(tokenizer, args.prompt, args.chat)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if args.stream else None
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            **gen_kwargs,
        )
    seconds = time.perf_counter() - t0
    new = out[0, inputs["input_ids"].shape[1] :]
    if streamer is None:
        print(tokenizer.decode(new, skip_special_tokens=True))
    path = "stock transformers" if args.stock else "to_atb()"
    extras = [f"quantize={args.quantize}"] * bool(args.quantize) + [f"draft={args.draft}"] * bool(args.draft)
    extras += ["compile (time includes compiling)"] * bool(args.compile)
    say(f"{len(new)} tokens in {seconds:.2f} s ({len(new) / seconds:.1f} tokens/s, prefill included) "
        f"with {path}{' ' + ' '.join(extras) if extras else ''}")  # fmt: skip
    stats = getattr(model, "atb_speculative_stats", None)  # set by the plugin's speculative decoder
    if args.draft and stats is not None:
        say(f"speculative ({args.draft}): acceptance {stats.acceptance_rate:.0%}, "
            f"{stats.tokens_per_target_forward:.2f} tokens per target forward")  # fmt: skip
    return 0
