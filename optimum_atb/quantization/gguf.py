"""`load_gguf`: a GGUF checkpoint loaded with its Q4_0 / Q4_1 / Q8_0 linear weights kept quantized.

transformers' own GGUF path dequantizes every tensor to float32. Here the model skeleton is built on the
meta device, float tensors (norms, F32/F16 weights) are copied, and the 32-element blocks of each
quantized linear weight are rewritten into :mod:`.formats` without passing through float:

* Q4_1 (``w = d * q + m``, q in 0..15) -> int4, group 32, ``scale = d``, ``zero = m + 8 d``;
* Q4_0 (``w = d * (q - 8)``) -> int4, group 32, ``scale = d``, ``zero = 0``;
* Q8_0 (``w = d * q``, q int8) -> int8 with per-group-of-32 scales.

The token embedding (a lookup, not a matmul) is dequantized from the same block decoders, and other
block types with the `gguf` package. llama.cpp stores LLaMA's q/k projections with rows permuted for its rotary layout; permuting
whole rows of blocks undoes that exactly.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from ..backends import warn_once
from .apply import replace_module
from .formats import dequantize, pack_int4
from .hf_quantizer import attach_config
from .linear import QuantLinear

_BLOCK = 32


def _blocks(data: np.ndarray, n: int, block_bytes: int) -> torch.Tensor:
    """Raw uint8 tensor data -> [N, K/32, block_bytes]."""
    return torch.from_numpy(np.array(data, copy=True)).view(torch.uint8).reshape(n, -1, block_bytes)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    return blocks[..., start : start + 2].contiguous().view(torch.float16)[..., 0].float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[N, B, 16] bytes -> [N, B*32] codes: element j < 16 in the low nibble of byte j, j >= 16 high."""
    codes = torch.cat([qs & 0xF, qs >> 4], dim=-1)
    return codes.reshape(qs.shape[0], -1)


def q4_to_int4(data: np.ndarray, n: int, with_min: bool):
    """Q4_1 (with_min) or Q4_0 blocks of an [N, K] weight -> (qweight, scale, zero) in the int4 format."""
    blocks = _blocks(data, n, 20 if with_min else 18)
    d = _f16(blocks, 0)
    qs = blocks[..., 4:] if with_min else blocks[..., 2:]
    zero = _f16(blocks, 2) + 8.0 * d if with_min else torch.zeros_like(d)
    return pack_int4(_nibbles(qs)), d, zero


def q8_0_to_int8(data: np.ndarray, n: int):
    """Q8_0 blocks of an [N, K] weight -> (qweight int8 [N, K], scale [N, K/32])."""
    blocks = _blocks(data, n, 34)
    return blocks[..., 2:].contiguous().view(torch.int8).reshape(n, -1), _f16(blocks, 0)


def _row_permutation(n: int, heads: int) -> torch.Tensor:
    """Rows of llama.cpp's rotary permutation, reversed (as transformers' LlamaTensorProcessor)."""
    dim = n // heads // 2
    return torch.arange(n).reshape(heads, dim, 2).transpose(1, 2).reshape(n)


def _gguf_to_hf_names(gguf, arch: str, model: nn.Module, num_layers: int) -> dict[str, str]:
    """GGUF tensor name -> the model's parameter name, from the `gguf` package's name table."""
    arch_id = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    if arch_id is None:
        raise ValueError(f"the gguf package does not know the architecture {arch!r}")
    table = gguf.get_tensor_name_map(arch_id, num_layers)
    names = {}
    for hf_name in model.state_dict():
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = table.get_name(base)
        if gguf_name is not None:
            names[f"{gguf_name}.{suffix}"] = hf_name
    return names


def load_gguf(
    path_or_dir: str, gguf_file: str | None = None, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Load a GGUF causal LM with its Q4_0/Q4_1/Q8_0 linear weights kept quantized (see module docstring).

    Args:
        path_or_dir: the .gguf file, or the folder holding `gguf_file`.
        gguf_file: file name inside `path_or_dir`.
        dtype: dtype of the float parameters (embedding, norms).
    Returns the model in eval mode; its quantized layers are :class:`QuantLinear`.
    """
    import gguf
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    folder, name = (path_or_dir, gguf_file) if gguf_file else os.path.split(path_or_dir)
    path = os.path.join(folder, name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config.dtype = dtype
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    reader = gguf.GGUFReader(path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    name_map = _gguf_to_hf_names(gguf, arch, model, config.num_hidden_layers)
    quant = gguf.GGMLQuantizationType
    kept: set[int] = set()
    for tensor in reader.tensors:
        hf_name = name_map.get(tensor.name)
        if hf_name is None:
            continue
        module_name, _, attr = hf_name.rpartition(".")
        module = model.get_submodule(module_name)
        n = int(tensor.shape[-1]) if len(tensor.shape) > 1 else int(tensor.shape[0])
        perm = None
        if arch == "llama" and attr == "weight" and (".attn_q." in tensor.name or ".attn_k." in tensor.name):
            heads = config.num_attention_heads if ".attn_q." in tensor.name else config.num_key_value_heads
            perm = _row_permutation(n, heads)
        kind = tensor.tensor_type
        if (
            isinstance(module, nn.Linear)
            and attr == "weight"
            and kind in (quant.Q4_0, quant.Q4_1, quant.Q8_0)
        ):
            bits = 8 if kind == quant.Q8_0 else 4
            if bits == 4:
                qweight, scale, zero = q4_to_int4(tensor.data, n, with_min=kind == quant.Q4_1)
            else:
                (qweight, scale), zero = q8_0_to_int8(tensor.data, n), None
            if perm is not None:
                qweight, scale = qweight[perm], scale[perm]
                zero = None if zero is None else zero[perm]
            qlayer = QuantLinear(
                module.in_features, module.out_features, bits, _BLOCK, bias=module.bias is not None
            )
            qlayer.set_quantized(qweight, scale, zero)
            if module.bias is not None:  # a bias listed later in the file is copied into qlayer.bias
                qlayer.bias = nn.Parameter(torch.empty(n, dtype=dtype, device="meta"), requires_grad=False)
            replace_module(model, module_name, qlayer)
            kept.add(bits)
            continue
        if (
            isinstance(module, nn.Linear)
            and attr == "weight"
            and kind not in (quant.F32, quant.F16, quant.BF16)
        ):
            warn_once(
                f"gguf-dequant-{kind.name}",
                f"optimum-atb: GGUF {kind.name} linear weights are dequantized (only Q4_0/Q4_1/Q8_0 stay quantized).",
            )
        if kind in (quant.Q4_0, quant.Q4_1):  # e.g. a token embedding: a lookup, kept in float
            values = dequantize(
                *q4_to_int4(tensor.data, n, with_min=kind == quant.Q4_1), 4, _BLOCK, torch.float32
            )
        elif kind == quant.Q8_0:
            values = dequantize(*q8_0_to_int8(tensor.data, n), None, 8, _BLOCK, torch.float32)
        else:
            values = torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, kind), dtype=np.float32))
            values = (
                values.reshape(tuple(reversed([int(s) for s in tensor.shape])))
                if values.dim() > 1
                else values
            )
        if perm is not None:
            values = values[perm]
        setattr(module, attr, nn.Parameter(values.to(dtype), requires_grad=False))
    model.tie_weights()
    leftover = [k for k, v in model.state_dict().items() if v.device.type == "meta"]
    if leftover:
        raise ValueError(f"{path} has no tensor for {leftover[:5]}{'...' if len(leftover) > 5 else ''}")
    model.generation_config = GenerationConfig.from_model_config(config)
    if kept:
        attach_config(model, min(kept), _BLOCK if min(kept) == 4 else None, False, [])
    return model.eval()
