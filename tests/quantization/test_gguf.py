"""GGUF blocks rewritten into our formats, checked against the `gguf` package's own dequantization
(the embedded SmolLM2 file loaded kept-quantized is tested in test_quality.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optimum_atb.quantization.formats import dequantize
from optimum_atb.quantization.gguf import q4_to_int4, q8_0_to_int8


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_block_conversion_matches_gguf_dequantize(kind):
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, kind)
    w = np.random.default_rng(0).standard_normal((16, 128)).astype(np.float32)
    data = gguf.quants.quantize(w, qtype)
    expected = torch.from_numpy(gguf.quants.dequantize(data, qtype).astype(np.float64)).reshape(16, 128)
    if kind == "Q8_0":
        qweight, scale = q8_0_to_int8(data, 16)
        got = dequantize(qweight, scale, None, 8, 32)
    else:
        got = dequantize(*q4_to_int4(data, 16, with_min=kind == "Q4_1"), 4, 32)
    assert torch.equal(got, expected)
