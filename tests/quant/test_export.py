"""Packed ternary export -> load: W_q reproduced exactly, logits equal, ~8x smaller weights, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rlcpm.config import QATConfig
from rlcpm.errors import CheckpointError, UnsupportedModelError
from rlcpm.models import load_model
from rlcpm.quant import BitLinear, TernaryLinear, convert_to_ternary, prepare_qat, save_ternary_model


def _qat_model(make_model, model_type="llama", group_size=32, **config):
    model = make_model(model_type, **config)
    return prepare_qat(model, QATConfig(group_size=group_size)).eval()


@pytest.mark.parametrize(
    "model_type, config",
    [("llama", {}), ("qwen2", {}), ("minicpm", {}), ("llama", {"tie_word_embeddings": True})],
    ids=["llama", "qwen2-bias", "minicpm", "llama-tied"],
)
def test_export_load_reproduces_w_q_and_logits_exactly(make_model, tmp_path, model_type, config):
    model = _qat_model(make_model, model_type, **config)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        qat_logits = model(ids)
    save_ternary_model(model, tmp_path)
    packed = load_model(tmp_path)
    layers = dict(packed.named_modules())
    for name, module in model.named_modules():
        if isinstance(module, BitLinear):
            assert isinstance(layers[name], TernaryLinear)
            assert torch.equal(layers[name].dequantized_weight(torch.float32), module.quantized_weight())
            if module.bias is not None:
                assert torch.equal(layers[name].bias, module.bias)
    assert type(packed.lm_head).__name__ == "Linear"
    with torch.no_grad():
        assert torch.equal(packed(ids), qat_logits)


def test_bfloat16_export_reproduces_w_q_in_bfloat16(make_model, tmp_path):
    model = _qat_model(make_model, "qwen3")
    save_ternary_model(model, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    packed = load_model(tmp_path)
    assert packed.dtype == torch.bfloat16
    q_proj = packed.model.layers[1].self_attn.q_proj
    expected = model.model.layers[1].self_attn.q_proj.quantized_weight().to(torch.bfloat16)
    assert torch.equal(q_proj.dequantized_weight(), expected)


def test_config_entry_and_tensor_layout(make_model, tmp_path):
    model = _qat_model(make_model, group_size=16)
    save_ternary_model(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitcpm_ternary"
    assert config["quantization_config"]["group_size"] == 16
    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"  # [hidden 64, intermediate 128]
    assert tensors[f"{name}.weight"].dtype == torch.uint8
    assert tensors[f"{name}.weight"].shape == (64, 128 // 4)
    assert tensors[f"{name}.weight_scale"].shape == (64, 128 // 16)
    assert tensors["lm_head.weight"].dtype == torch.float32  # the LM head and embeddings stay dense


def test_packed_layers_are_about_8x_smaller_than_bfloat16(make_model, tmp_path):
    """Bytes of the quantized layers in the files: codes are 8x smaller than bf16; with one bf16
    scale per group of g they are 16 / (2 + 16 / g): 6.4x at g = 32, 7.5x at g = 128."""
    model = make_model("llama", hidden_size=256, intermediate_size=512, num_attention_heads=4)
    dense_bytes = sum(m.weight.numel() * 2 for m in model.modules() if isinstance(m, torch.nn.Linear)) - (
        model.lm_head.weight.numel() * 2
    )
    for group_size, expected_ratio in [(32, 6.4), (128, 16 / 2.125)]:
        qat = prepare_qat(
            make_model("llama", hidden_size=256, intermediate_size=512), QATConfig(group_size=group_size)
        )
        out = save_ternary_model(qat, tmp_path / f"g{group_size}", dtype=torch.bfloat16)
        with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
            sizes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}
        code_bytes = sum(s[0] * s[1] for n, s in sizes.items() if n.endswith("proj.weight"))
        scale_bytes = sum(s[0] * s[1] * 2 for n, s in sizes.items() if n.endswith("weight_scale"))
        assert dense_bytes == 8 * code_bytes
        assert dense_bytes / (code_bytes + scale_bytes) == pytest.approx(expected_ratio, rel=1e-9)


def test_convert_to_ternary_in_memory_equals_the_loaded_export(make_model, tmp_path):
    model = _qat_model(make_model, "qwen2")
    save_ternary_model(model, tmp_path)
    converted = convert_to_ternary(model)
    loaded = load_model(tmp_path)
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(converted(ids), loaded(ids))
    assert converted.model.layers[0].mlp.up_proj.weight.dtype == torch.uint8


def test_load_errors_name_the_problem(make_model, tmp_path):
    model = _qat_model(make_model)
    save_ternary_model(model, tmp_path)
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())

    config["quantization_config"]["quant_method"] = "gptq"
    config_file.write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="quant_method 'gptq' is not supported"):
        load_model(tmp_path)

    config["quantization_config"].update(quant_method="bitcpm_ternary", group_size=64)
    config_file.write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"down_proj.weight_scale' has shape \(64, 4\), expected \(64, 2\)"
    ):
        load_model(tmp_path)

    config["quantization_config"]["group_size"] = 32
    config_file.write_text(json.dumps(config))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.weight"][0, 0] = 0xFF  # code 3 in every bit pair
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unused 2-bit code 3"):
        load_model(tmp_path)

    del tensors["model.layers.1.mlp.up_proj.weight_scale"]
    tensors["model.layers.0.self_attn.q_proj.weight"][0, 0] = 0
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing: model.layers.1.mlp.up_proj.weight_scale"):
        load_model(tmp_path)


def test_export_needs_a_qat_model(make_model, tmp_path):
    with pytest.raises(CheckpointError, match="needs a QAT model"):
        save_ternary_model(make_model(), tmp_path)


def test_export_of_a_model_loaded_from_a_qat_checkpoint_is_not_marked_latent(make_model, tmp_path, rlcpm_log):
    """QAT started again from an earlier QAT checkpoint's model/ (its config marks latent weights):
    the packed export is the ternary model, so loading it must not warn that it holds latent weights."""
    from rlcpm.models.checkpoint import QAT_LATENT_KEY

    model = _qat_model(make_model)
    model.config.extra[QAT_LATENT_KEY] = {"group_size": 32}
    save_ternary_model(model, tmp_path)
    assert QAT_LATENT_KEY not in json.loads((tmp_path / "config.json").read_text())
    assert isinstance(load_model(tmp_path).model.layers[0].mlp.up_proj, TernaryLinear)
    assert "latent weights" not in rlcpm_log.text
