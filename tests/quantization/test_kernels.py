"""Each quantized linear kernel against dequantize-then-matmul in float64, per backend and format."""

from __future__ import annotations

import npu_emulator
import pytest
import torch

import optimum_atb
from optimum_atb.kernels import quant_torch
from optimum_atb.kernels.dispatch import get_kernel
from optimum_atb.kernels.quant_triton import tile_sizes
from optimum_atb.quantization import QuantLinear
from optimum_atb.quantization.formats import dequantize, pack_int4, quantize_int4, quantize_int8, unpack_int4

# (bits, group_size): int8 per channel, int4 at two group sizes, int8 per group of 32 (random codes and
# scales, as GGUF Q8_0 has them) and of 64 (quantized by us)
FORMATS = [(8, None), (4, 32), (4, 64), (8, 32), (8, 64)]
# bf16 activations (torch CPU kernels, NPU): relative to the output's max magnitude
BF16_TOL = 2e-2


def _layer(bits: int, group: int | None, k: int = 128, n: int = 48, bias: bool = True) -> QuantLinear:
    lin = torch.nn.Linear(k, n, bias=bias)
    if (bits, group) != (8, 32):
        return QuantLinear.from_linear(lin, bits, group)
    layer = QuantLinear(k, n, 8, 32, bias=bias)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    layer.set_quantized(q, torch.rand(n, k // 32) * 0.01 + 1e-3, None)
    if bias:
        layer.bias.data.copy_(lin.bias.detach())
    return layer


def _reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    w = dequantize(layer.weight, layer.weight_scale, layer.weight_zero, layer.bits, layer.group_size)
    ref = x.double() @ w.t()
    return ref if layer.bias is None else ref + layer.bias.double()


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def test_int4_pack_roundtrip():
    q = torch.randint(0, 16, (8, 64))
    assert torch.equal(unpack_int4(pack_int4(q)), q.to(torch.int32))


@pytest.mark.parametrize("group", [32, 64])
def test_int4_quantization_error_is_at_most_half_a_step(group):
    w = torch.randn(32, 128)
    qweight, scale, zero = quantize_int4(w, group)
    err = (dequantize(qweight, scale, zero, 4, group) - w.double()).abs()
    step = scale.double().repeat_interleave(group, dim=1)
    assert (err <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("group", [None, 32])
def test_int8_quantization_error_is_at_most_half_a_step(group):
    w = torch.randn(32, 128)
    w[:, :32] *= 10  # an outlier group: per channel it sets the whole row's step, per group only its own
    qweight, scale = quantize_int8(w, group)
    assert scale.shape == ((32,) if group is None else (32, 128 // group))
    err = (dequantize(qweight, scale, None, 8, group) - w.double()).abs()
    step = scale.double()[:, None] if group is None else scale.double().repeat_interleave(group, dim=1)
    assert (err <= step / 2 + 1e-6).all()
    if group is not None:  # the groups without the outlier get a step about ten times finer
        assert err[:, 32:].max() < 0.2 * quantize_int8(w)[1].max()


@pytest.mark.parametrize("bits,group", [(8, None), (8, 32), (4, 32)])
def test_quantize_weight_in_row_chunks_equals_whole(monkeypatch, bits, group):
    """Rows are quantized a chunk at a time (to bound temporaries): the result must not depend on it."""
    from optimum_atb.quantization import linear

    w = torch.randn(37, 64)
    whole = linear.quantize_weight(w, bits, group)
    monkeypatch.setattr(linear, "ROWS_PER_CHUNK", 8)
    chunked = linear.quantize_weight(w, bits, group)
    assert len(whole) == len(chunked) == 3
    for a, b in zip(whole, chunked):
        assert (a is None and b is None) or torch.equal(a, b)
    assert chunked[0].shape[0] == 37


@pytest.mark.parametrize("bits,group", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend(bits, group, dtype):
    layer = _layer(bits, group)
    x = torch.randn(2, 3, 128).to(dtype)
    with optimum_atb.use_backend("torch"):
        y = layer(x)
    assert y.dtype == dtype and y.shape == (2, 3, 48)
    assert _rel_err(y, _reference(layer, x)) < BF16_TOL


def test_torch_backend_uses_packed_kernels_for_supported_shapes():
    for bits, group, kind in [
        (8, None, "int8"),
        (4, 32, "int4"),
        (8, 32, "int8_groups"),
        (8, 64, "int8_groups"),
    ]:
        layer = _layer(bits, group)
        with optimum_atb.use_backend("torch"):
            layer(torch.randn(1, 128))
        assert layer._prepared["torch"]["kind"] == kind


def test_torch_int8_kernel_takes_a_misaligned_weight():
    """Buffers loaded from safetensors need not be 64-byte aligned; the packed int8 kernel crashed on them."""
    qweight, scale = quantize_int8(torch.randn(48, 64))
    storage = torch.empty(qweight.numel() + 8, dtype=torch.int8)
    misaligned = storage[8:].view(48, 64)
    misaligned.copy_(qweight)
    assert misaligned.data_ptr() % 64 != 0
    x = torch.randn(20, 64)  # 16+ rows: the kernel's vectorised path
    state = get_kernel("weight_quant_prepare", "torch")(
        qweight=misaligned, scale=scale, zero=None, bits=8, group_size=None
    )
    out = get_kernel("weight_quant_matmul", "torch")(x=x, state=state, bias=None)
    expected = x.double() @ dequantize(qweight, scale, None, 8, None, torch.float64).t()
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.mark.parametrize("row_reduce", [True, False], ids=["avx512", "avx2"])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("n", [80, 81], ids=["even-n", "odd-n"])
def test_torch_int8_under_compile_reduces_one_row_where_it_pays(rows, row_reduce, n, monkeypatch):
    """Where the one-row reduce pays (AVX-512), a compiled batch-1 decode step computes int8 as
    sum(x * q) * s in float32 (fused by inductor), the output channels in ROW_REDUCE_SPLIT parts when they
    divide evenly: the float64 result to fp32 precision. More rows, or a CPU where it does not pay (AVX2),
    keep the packed kernel and its bf16 activations."""
    monkeypatch.setattr(quant_torch, "INT8_ROW_REDUCE", row_reduce)
    layer = _layer(8, None, k=192, n=n, bias=False)
    x = torch.randn(rows, 192)
    reduces = rows == 1 and row_reduce
    with optimum_atb.use_backend("torch"):
        eager = layer(x)
        seen: list[str] = []

        def recording_backend(gm, example_inputs):
            seen.extend(
                str(node.target) for node in gm.graph.nodes if node.op in ("call_function", "call_method")
            )
            return gm

        torch._dynamo.reset()
        traced = torch.compile(layer, backend=recording_backend, fullgraph=True, dynamic=False)(x)
        compiled = torch.compile(layer, backend="inductor", fullgraph=True, dynamic=False)(x)
    uses_packed = any("_weight_int8pack_mm" in target for target in seen)
    assert uses_packed == (not reduces)
    if reduces:
        assert quant_torch.ROW_REDUCE_SPLIT > 1
        assert seen.count("sum") == (
            quant_torch.ROW_REDUCE_SPLIT if n % quant_torch.ROW_REDUCE_SPLIT == 0 else 1
        )
    for y in (traced, compiled):
        assert _rel_err(y, _reference(layer, x)) < (1e-5 if reduces else BF16_TOL)
    if not reduces:
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def _aten_ops(fn) -> list[str]:
    """Names of the aten ops `fn()` runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    with Recorder() as recorder:
        fn()
    return recorder.names


def _recorded_call(layer: QuantLinear, x: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """(layer(x), the aten ops that call ran), the layer's kernel state prepared beforehand."""
    with optimum_atb.use_backend("torch"):
        layer(x[:1])
        out: list[torch.Tensor] = []
        ops = _aten_ops(lambda: out.append(layer(x)))
    return out[0], ops


# (bits, group, the threshold of the float32 route, the packed kernel it replaces)
MANY_ROW_FORMATS = [
    (8, None, "INT8_DEQUANT_ROWS", "_weight_int8pack_mm"),
    (4, 32, "INT4_DEQUANT_ROWS", "_weight_int4pack_mm"),
    (4, 64, "INT4_DEQUANT_ROWS", "_weight_int4pack_mm"),
]


@pytest.mark.parametrize("bits,group,threshold,packed_op", MANY_ROW_FORMATS)
@pytest.mark.parametrize("rows", [15, 16, 41])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [8192, 32], ids=["one-chunk", "3-chunks"])
def test_torch_many_rows_multiply_the_exact_weight_in_float32(
    bits, group, threshold, packed_op, rows, dtype, chunk, monkeypatch
):
    """From `INT8_DEQUANT_ROWS` / `INT4_DEQUANT_ROWS` rows (a prefill) per-channel int8 and int4 multiply the
    exact float32 weight with float32 activations through fp32 `F.linear` (int8: the codes, times the scale
    after; int4: unpacked in a permuted column order, x permuted alike), `DEQUANT_CHUNK` output channels at
    a time: the float64 result to fp32 precision. Fewer rows keep the packed kernel and its bf16
    activations."""
    monkeypatch.setattr(quant_torch, threshold, 16)
    monkeypatch.setattr(quant_torch, "DEQUANT_CHUNK", chunk)  # 80 output channels: one chunk or 32 + 32 + 16
    layer = _layer(bits, group, k=192, n=80)
    x = torch.randn(rows, 192).to(dtype)
    y, ops = _recorded_call(layer, x)
    dequantizes = rows >= 16
    assert any(packed_op in op for op in ops) == (not dequantizes)
    assert y.dtype == dtype and y.shape == (rows, 80)
    tol = (
        (1e-5 if dtype == torch.float32 else 2**-7) if dequantizes else BF16_TOL
    )  # bf16: output and bias roundings
    assert _rel_err(y, _reference(layer, x)) < tol


@pytest.mark.parametrize("rows", [7, 8, 20, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [8192, 32], ids=["one-chunk", "3-chunks"])
def test_torch_int8_mid_rows_run_a_bf16_gemm_on_the_codes(rows, dtype, chunk, monkeypatch):
    """From `INT8_BF16_ROWS` up to `INT8_DEQUANT_ROWS` rows per-channel int8 multiplies bf16 activations with
    its codes (exact in bf16) through a bf16 GEMM and scales after: the float64 product of the bf16-rounded
    activations within one bf16 rounding of the output and of the scale. Fewer rows keep the packed kernel,
    more take the float32 route."""
    monkeypatch.setattr(quant_torch, "INT8_BF16_ROWS", 8)
    monkeypatch.setattr(quant_torch, "INT8_DEQUANT_ROWS", 32)
    monkeypatch.setattr(quant_torch, "DEQUANT_CHUNK", chunk)
    layer = _layer(8, None, k=192, n=80)
    x = torch.randn(rows, 192).to(dtype)
    y, ops = _recorded_call(layer, x)
    assert y.dtype == dtype and y.shape == (rows, 80)
    assert any("_weight_int8pack_mm" in op for op in ops) == (rows < 8)
    exact = _rel_err(y, _reference(layer, x))
    if rows >= 32:  # the float32 route
        assert exact < (1e-5 if dtype == torch.float32 else 2**-7)
    elif rows >= 8:
        assert _rel_err(y, _reference(layer, x.bfloat16())) < 2**-7
        assert dtype == torch.bfloat16 or exact > 1e-5  # the activations were rounded to bf16
    else:
        assert exact < BF16_TOL


def test_int8_bf16_gemm_runs_only_on_cpus_with_bf16_in_hardware(cpu_flags):
    """Where bf16 has no hardware, the bf16 GEMM is about 2-3x slower than the packed kernel (session 20's
    Ice Lake Xeon): it is taken (`INT8_BF16_ROWS` below `INT8_DEQUANT_ROWS`) exactly when the CPU reports
    AVX512-BF16 or AMX in /proc/cpuinfo, and the float32 route then starts earlier (64 rows, where it beats
    the packed kernel there)."""
    native = bool({"avx512_bf16", "amx_bf16"} & cpu_flags)
    assert quant_torch.NATIVE_BF16 == native
    assert (quant_torch.INT8_BF16_ROWS < quant_torch.INT8_DEQUANT_ROWS) == native
    assert quant_torch.INT8_DEQUANT_ROWS == (128 if native else 64)


def test_torch_backend_falls_back_with_warning_for_odd_shapes():
    layer = QuantLinear.from_linear(torch.nn.Linear(40, 8), 8, None)  # in_features % 16 != 0
    x = torch.randn(3, 40)
    with pytest.warns(UserWarning, match="dequantizes its weight"), optimum_atb.use_backend("torch"):
        y = layer(x)
    assert _rel_err(y, _reference(layer, x)) < 1e-5


@pytest.mark.parametrize("bits,group", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [5, 40])  # a decode-sized tile and a prefill-sized one
def test_triton_backend_interpreted(bits, group, dtype, rows):
    """fp32: within 1e-5 of float64. fp16/bf16: the weights are never rounded to the activations' dtype,
    so the output is float64's product of the same operands rounded once to that dtype (float32
    accumulation may move a rare element by one unit in the last place)."""
    layer = _layer(bits, group, k=96 if group != 64 else 128, n=40, bias=False)  # K, N off the tiles
    x = torch.randn(rows, layer.in_features).to(dtype)
    with optimum_atb.use_backend("triton"):
        y = layer(x)
    ref = _reference(layer, x)
    assert y.dtype == dtype and y.shape == (rows, 40)
    if dtype == torch.float32:
        assert _rel_err(y, ref) < 1e-5
    else:
        assert (y == ref.to(dtype)).double().mean().item() >= 0.99
        torch.testing.assert_close(y.double(), ref, rtol=1.5 * torch.finfo(dtype).eps, atol=1e-6)


def test_triton_backend_adds_bias():
    layer = _layer(4, 32, k=96, n=40, bias=True)
    x = torch.randn(2, 3, 96)
    with optimum_atb.use_backend("triton"):
        y = layer(x)
    assert y.shape == (2, 3, 40) and _rel_err(y, _reference(layer, x)) < 1e-5


def test_triton_fp32_products_are_ieee_not_tf32(monkeypatch):
    """On a GPU ``tl.dot`` rounds fp32 operands to TF32 unless told otherwise (the interpreter does not,
    so the launch itself is checked): an fp32 model must get fp32 products, as stock PyTorch gives it."""
    from optimum_atb.kernels import quant_triton

    launches = []
    kernel = quant_triton._wq_matmul_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs)
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(quant_triton, "_wq_matmul_kernel", Recorder())
    layer = _layer(8, None, k=64, n=32)
    with optimum_atb.use_backend("triton"):
        layer(torch.randn(2, 64))
    assert [kw.get("PREC") for kw in launches] == ["ieee"]


@pytest.mark.parametrize("group", [None, 32, 64, 128, 256])
@pytest.mark.parametrize("rows", [1, 16, 17, 4096])
def test_triton_tiles_keep_each_k_block_inside_one_group(group, rows):
    block_m, block_n, block_k = tile_sizes(rows, 4096, group)
    assert group is None or group % block_k == 0
    assert block_m >= 16 and block_n >= 16 and block_k >= 16  # tl.dot's minimum


@pytest.mark.parametrize("bits,group", FORMATS)
def test_npu_backend_emulated(bits, group):
    layer = _layer(bits, group)
    x = torch.randn(2, 3, 128)
    with npu_emulator.installed() as npu, optimum_atb.use_backend("npu"):
        y = layer(x)
    assert [name for name, _ in npu.calls][-1] == "npu_weight_quant_batchmatmul"
    args = npu.calls[-1][1]
    assert args["antiquant_group_size"] == (group or 0)
    assert args["x"].dtype == torch.bfloat16  # fp32 activations run in bf16, as documented
    assert y.dtype == torch.float32 and _rel_err(y, _reference(layer, x)) < BF16_TOL
