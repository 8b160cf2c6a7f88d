"""The ``optimum-atb`` command: ``demo``, ``generate``, ``bench`` and ``env``.

User mistakes (a missing model, an option that cannot work here) end with one line on stderr and a
non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from ._common import DTYPES, UsageError

QUANT = ("int8", "int4")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model folder or hub id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--gguf", metavar="FILE", help="a .gguf file (or its name inside --model's folder)")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="weights dtype (default float32)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optimum-atb", description="Ascend Transformer Boost ideas for Hugging Face Transformers."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,generate,bench,env}")

    demo = sub.add_parser("demo", help="chat prompts through stock transformers and the plugin, side by side")
    _model_options(demo)
    demo.add_argument("--quick", action="store_true", help="one prompt, 16 new tokens (for CI)")
    demo.add_argument("--max-new-tokens", type=_positive, help="new tokens per prompt (default 48, quick 16)")

    gen = sub.add_parser("generate", help="answer one prompt with the plugin")
    _model_options(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    gen.add_argument("--quantize", choices=QUANT, help="weight-only quantization of the model")
    gen.add_argument(
        "--draft", metavar="int4|ngram|PATH",
        help="speculative decoding: int4 self-draft, n-gram prompt lookup, or a draft model (folder or .gguf)",
    )  # fmt: skip
    gen.add_argument("--max-new-tokens", type=_positive, default=64)
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    gen.add_argument("--stock", action="store_true", help="stock transformers: no to_atb() (for comparison)")
    gen.add_argument(
        "--compile",
        action="store_true",
        help="to_atb(compile=True): decode through a compiled step (compiles first: ~20-30 s on a small CPU, "
        "about two minutes with an empty inductor cache)",
    )

    bench = sub.add_parser("bench", help="the benchmark matrix (source checkout only)")
    bench.add_argument("--suite", choices=("quick", "full"), default="quick")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    bench.add_argument("--out", default="bench-results", help="output folder (default ./bench-results)")
    bench.add_argument("--threads", type=_positive, help="torch threads (default: all cores)")

    env = sub.add_parser("env", help="versions, backends, devices, CPU features, threads")
    env.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "env":
        from . import env

        return env.run(as_json=args.json)
    if args.command == "bench":
        from . import bench

        return bench.run(args, argv)
    if args.command == "demo":
        from . import demo

        return demo.run(args)
    from . import generate

    return generate.run(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``optimum-atb`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args, argv)
    except UsageError as exc:
        print(f"optimum-atb: error: {exc}", file=sys.stderr)
        return 2
    except NotImplementedError as exc:
        print(f"optimum-atb: error: not available in this build {exc}".rstrip(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("optimum-atb: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from ..errors import OptimumAtbError

        if not isinstance(exc, OptimumAtbError):
            raise
        print(f"optimum-atb: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
