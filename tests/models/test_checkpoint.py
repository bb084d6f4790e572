"""save_model / load_model: sharding, streaming order, and bad directories with clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlcpm.errors import CheckpointError, UnsupportedModelError
from rlcpm.models import load_model, save_model


@pytest.fixture
def saved(make_model, tmp_path):
    model = make_model("qwen2", num_hidden_layers=2)
    save_model(model, tmp_path)
    return model, tmp_path


def test_sharded_roundtrip_and_stale_files_removed(make_model, random_ids, tmp_path):
    model = make_model("llama", tie_word_embeddings=True)
    save_model(model, tmp_path)  # first a single file ...
    assert (tmp_path / "model.safetensors").is_file()
    save_model(model, tmp_path, max_shard_bytes=30_000)  # ... then shards in the same directory
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == shards
    assert "lm_head.weight" not in index["weight_map"]
    names = {n for n, _ in model.named_parameters()} - {"lm_head.weight"}
    assert set(index["weight_map"]) == names
    assert index["metadata"]["total_size"] == sum(
        p.numel() * 4 for n, p in model.named_parameters() if n in names
    )
    loaded = load_model(tmp_path)
    ids = random_ids(2, 9)
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_load_streams_one_tensor_at_a_time(saved, monkeypatch):
    """Weights are copied tensor by tensor from safe_open handles; nothing loads a whole file."""
    import rlcpm.models.checkpoint as ckpt

    monkeypatch.setattr("safetensors.torch.load_file", lambda *a, **k: pytest.fail("whole-file load"))
    reads = []
    real_open = ckpt.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_slice(self, name):
            return self.inner.get_slice(name)

        def get_tensor(self, name):
            reads.append(name)
            return self.inner.get_tensor(name)

    monkeypatch.setattr(ckpt, "safe_open", Spy)
    model, path = saved
    load_model(path)
    assert sorted(reads) == sorted(n for n, _ in model.named_parameters())


def test_missing_config(saved):
    _, path = saved
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_model(path)


def test_config_not_json(saved):
    _, path = saved
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_model(path)


def test_unknown_model_type_names_it_and_lists_supported(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"'gpt_neox'.*llama, qwen2, qwen3, minicpm"):
        load_model(path)


def test_missing_tensor_is_named(saved):
    _, path = saved
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"missing from model\.safetensors: model\.layers\.1\.mlp\.up_proj\.weight"
    ):
        load_model(path)


def test_shape_mismatch_names_file_and_tensor(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 100
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape",
    ):
        load_model(path)


def test_unexpected_tensor_is_named(saved):
    _, path = saved
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.7.self_attn.q_proj.weight"] = torch.zeros(64, 64)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"unexpected tensor 'model\.layers\.7\.self_attn\.q_proj\.weight'"
    ):
        load_model(path)


def test_corrupt_safetensors_names_the_file(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:7] + b"garbage" + data[14:100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read"):
        load_model(path)


def test_index_pointing_to_a_missing_shard(make_model, tmp_path):
    save_model(make_model("llama"), tmp_path, max_shard_bytes=30_000)
    second = sorted(tmp_path.glob("model-*.safetensors"))[1]
    second.unlink()
    with pytest.raises(
        CheckpointError, match=rf"{second.name}: listed in model\.safetensors\.index\.json but missing"
    ):
        load_model(tmp_path)


@pytest.mark.parametrize("weight_map", [["model.norm.weight"], {"model.norm.weight": None}])
def test_malformed_index_names_the_file(make_model, tmp_path, weight_map):
    """Was an AttributeError ('list' object has no attribute 'items') / a TypeError on the path."""
    save_model(make_model("llama"), tmp_path, max_shard_bytes=30_000)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors\.index\.json: not a valid safetensors index"
    ):
        load_model(tmp_path)


def test_no_weights_at_all(saved):
    _, path = saved
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_model(path)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="model directory not found"):
        load_model(tmp_path / "nope")


def test_a_device_that_is_not_here_is_named(saved):
    """device="cuda" without a GPU raised torch's bare AssertionError ('Torch not compiled with CUDA
    enabled'); a misspelt device a RuntimeError from deep inside to_empty."""
    _, path = saved
    absent = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(CheckpointError, match=rf"device '{absent}': {torch.cuda.device_count()} CUDA device"):
        load_model(path, device=absent)
    with pytest.raises(CheckpointError, match=r"device 'gpu' is not a torch device"):
        load_model(path, device="gpu")


def test_missing_tokenizer_directory_is_named_not_read_as_a_hub_id(tmp_path):
    from rlcpm.models.checkpoint import load_tokenizer

    with pytest.raises(CheckpointError, match=r"tokenizer directory not found: .*nope \(rlcpm loads local"):
        load_tokenizer(tmp_path / "nope")


def test_a_tied_checkpoint_storing_another_lm_head_warns(make_model, tmp_path, caplog):
    """tie_word_embeddings with a stored lm_head.weight that differs: the head is the embeddings
    (as vLLM does), and the user is told, since transformers 5 would use the stored head."""
    model = make_model("llama", tie_word_embeddings=True)
    save_model(model, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with caplog.at_level("WARNING", logger="rlcpm.models"):
        load_model(tmp_path)  # an equal copy: nothing to say
    assert "different lm_head.weight" not in caplog.text
    tensors["lm_head.weight"] += 1.0
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with caplog.at_level("WARNING", logger="rlcpm.models"):
        loaded = load_model(tmp_path)
    assert "different lm_head.weight" in caplog.text
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
