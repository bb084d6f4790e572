"""peft LoRA on the rlcpm decoder: trains, merges back to plain weights with equal outputs."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from rlcpm.models import CausalLM, save_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_lora_trains_and_merges(make_model, random_ids, tmp_path):
    model = make_model("qwen3", num_key_value_heads=2)
    base_names = sorted(n for n, _ in model.named_parameters())
    frozen_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == set(TARGETS)

    ids = random_ids(4, 16)
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    losses = []
    for _ in range(12):
        logits = peft_model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight, frozen_before)

    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(ids)
    merged = peft_model.merge_and_unload()
    assert isinstance(merged, CausalLM)
    assert sorted(n for n, _ in merged.named_parameters()) == base_names
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, frozen_before)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), adapted, atol=1e-4, rtol=1e-5)
    save_model(merged, tmp_path)  # merged weights are a plain checkpoint again
    assert (tmp_path / "model.safetensors").is_file()


def test_lora_with_packed_forward_and_gradient_checkpointing(make_model, random_ids):
    from rlcpm.models import AttentionMetadata

    model = make_model("llama")
    model.gradient_checkpointing_enable()
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft_model.train()
    ids = random_ids(20)
    hidden = peft_model(ids, meta=AttentionMetadata.packed([12, 8]), return_hidden=True)
    assert hidden.shape == (20, 64)
    hidden.pow(2).mean().backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
