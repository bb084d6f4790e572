"""BitCPM ternary quantization (SPECS §4): QAT, packed export, ternary inference.

    from rlcpm.quant import prepare_qat, save_ternary_model
    prepare_qat(model, recipe.learner.qat)        # decoder nn.Linear -> BitLinear (in place)
    ...train: forward uses W_q = clamp(round(W / s), -1, 1) * s per group, STE backward...
    save_ternary_model(model, "out/")             # 2-bit codes + group scales, quantization_config
    model = rlcpm.models.load_model("out/")       # TernaryLinear layers, ternary matmul forward

See docs/qat.md. Transformations of a built model: the model code does not know about them.
"""

from rlcpm.quant.bitlinear import BitLinear
from rlcpm.quant.export import QUANT_METHOD, convert_to_ternary, quantization_config, save_ternary_model
from rlcpm.quant.loading import load_quantized_model
from rlcpm.quant.qat import (
    is_qat_model,
    prepare_qat,
    qat_group_sizes,
    quantizable_linears,
    quantized_named_tensors,
    with_rewarmup,
)
from rlcpm.quant.ternary import fake_quantize, group_scales, per_tensor_fake_quantize, quantize, ternary_ste
from rlcpm.quant.ternary_linear import TernaryLinear

__all__ = [
    "QUANT_METHOD",
    "BitLinear",
    "TernaryLinear",
    "convert_to_ternary",
    "fake_quantize",
    "group_scales",
    "is_qat_model",
    "load_quantized_model",
    "per_tensor_fake_quantize",
    "prepare_qat",
    "qat_group_sizes",
    "quantizable_linears",
    "quantization_config",
    "quantize",
    "quantized_named_tensors",
    "save_ternary_model",
    "ternary_ste",
    "with_rewarmup",
]
