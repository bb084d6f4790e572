"""QAT inside the Learner: BitLinear policy, W_q streamed to the engine, LR re-warmup, checkpoints
keep the latent weights, export_hf writes the packed model, and the engine runs packed models."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from rlcpm.config import deep_merge, load_recipe
from rlcpm.errors import RecipeError
from rlcpm.kernels.cpu_gemm import OneDNNLinear
from rlcpm.learner.batch import SFTSequence
from rlcpm.learner.learner import Learner
from rlcpm.models import load_model
from rlcpm.quant import BitLinear, TernaryLinear, fake_quantize, group_scales
from rlcpm.rollout import Engine, SamplingParams

PROMPTS = [[5, 17, 42, 8], [99, 3, 61], [7, 7, 120, 33, 2]]


@pytest.fixture
def make_learner(tiny_model_dir, tmp_path):
    """make_learner(overrides) -> a Learner (SFT, QAT with g = 32) on the tiny model."""

    def make(overrides: dict | None = None) -> Learner:
        base = {
            "seed": 0,
            "run_dir": str(tmp_path / "run"),
            "model": {"path": str(tiny_model_dir), "device": "cpu", "dtype": "float32"},
            "data": {"train": {"task": "arithmetic", "num_samples": 8}},
            "algorithm": {"name": "sft"},
            "learner": {
                "lr": 1e-2,
                "total_steps": 20,
                "max_grad_norm": None,
                "qat": {"group_size": 32, "rewarmup_steps": 4},
            },
        }
        return Learner(load_recipe(data=deep_merge(base, overrides or {})))

    return make


def _sft_batch():
    generator = torch.Generator().manual_seed(0)
    return [SFTSequence(p, torch.randint(10, 200, (12,), generator=generator).tolist()) for p in PROMPTS]


def test_policy_is_quantized_and_named_weights_are_w_q(make_learner):
    learner = make_learner()
    layers = dict(learner.policy.named_modules())
    assert isinstance(layers["model.layers.0.self_attn.q_proj"], BitLinear)
    head = layers["lm_head"]  # full precision: a plain linear (oneDNN's on a CPU learner)
    assert isinstance(head, torch.nn.Linear) and not isinstance(head, BitLinear)
    assert layers["model.layers.0.self_attn.q_proj"].use_onednn == isinstance(head, OneDNNLinear)
    learner.sft_step(_sft_batch())  # latent weights move; W_q follows them
    latent = dict(learner.policy.named_parameters())
    for name, tensor in learner.named_weights():
        if name.endswith("proj.weight"):
            assert torch.equal(tensor, fake_quantize(latent[name], 32))
            s = group_scales(latent[name], 32).repeat_interleave(32, dim=-1)
            assert bool(((tensor == s) | (tensor == 0) | (tensor == -s)).all())
        else:
            assert torch.equal(tensor, latent[name])


def test_engine_fed_by_weight_buckets_samples_from_the_trained_model(make_learner, tiny_model_dir):
    """Rollouts come from the QAT model: the engine's behaviour log-probs are the learner's."""
    learner = make_learner()
    learner.sft_step(_sft_batch())
    engine = Engine.from_pretrained(str(tiny_model_dir), dtype="float32", max_num_seqs=4)
    for bucket in learner.weight_buckets(bucket_bytes=64 * 1024):
        engine.update_weights(bucket, version=1, strict=False)
    outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.0, seed=3))
    learner_logprobs = learner.response_logprobs(PROMPTS, [o.token_ids for o in outs])
    for out, expected in zip(outs, learner_logprobs):
        torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(expected), rtol=0, atol=2e-5)


def test_learning_rate_rewarms_when_qat_switches_on(make_learner):
    learner = make_learner({"learner": {"schedule": {"name": "constant", "warmup_steps": 0}}})
    lrs = []
    for _ in range(6):
        lrs.append(learner.optimizer.param_groups[0]["lr"])
        learner.sft_step(_sft_batch())
    assert lrs == pytest.approx([1e-2 * f for f in (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)])
    plain = make_learner({"learner": {"qat": {"enabled": False}}})
    assert plain.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)  # no QAT: no warmup


def test_qat_sft_lowers_the_loss(make_learner):
    learner = make_learner({"learner": {"lr": 3e-3, "qat": {"rewarmup_steps": 2}}})
    losses = [learner.sft_step(_sft_batch())["train/loss"] for _ in range(12)]
    assert losses[-1] < 0.8 * losses[0]


def test_checkpoint_keeps_latent_weights_and_export_is_packed(make_learner, tmp_path, rlcpm_log):
    learner = make_learner()
    learner.sft_step(_sft_batch())
    latent = {name: p.detach().clone() for name, p in learner.policy.named_parameters()}
    learner.save_checkpoint(tmp_path / "ckpt")
    saved = load_file(str(tmp_path / "ckpt" / "model" / "model.safetensors"))
    assert all(torch.equal(saved[name], latent[name]) for name in latent)
    load_model(tmp_path / "ckpt" / "model")  # the latent weights, in full precision: warned
    assert "holds the latent weights of a QAT checkpoint" in rlcpm_log.text

    resumed = make_learner()
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert all(torch.equal(p, latent[name]) for name, p in resumed.policy.named_parameters())
    assert (
        resumed.step == 1
        and resumed.optimizer.param_groups[0]["lr"] == learner.optimizer.param_groups[0]["lr"]
    )

    learner.export_hf(tmp_path / "final")
    packed = load_model(tmp_path / "final")
    assert isinstance(packed.model.layers[1].mlp.gate_proj, TernaryLinear)
    ids = torch.tensor([PROMPTS[2]])
    # Bit for bit against the same weights on PyTorch's own GEMM, which the packed model runs on;
    # the learner's oneDNN GEMM adds in another order on some CPUs (3.6e-7 apart on a Xeon).
    plain = make_learner({"learner": {"cpu_gemm": "default"}})
    plain.load_checkpoint(tmp_path / "ckpt")
    for policy in (learner.policy, plain.policy):
        policy.eval()
    with torch.no_grad():
        assert torch.equal(packed(ids), plain.policy(ids))
        torch.testing.assert_close(packed(ids), learner.policy(ids), rtol=0, atol=1e-5)


def test_engine_runs_a_packed_model_like_the_dense_w_q_model(make_learner, tiny_model_dir, tmp_path):
    learner = make_learner()
    learner.sft_step(_sft_batch())
    learner.export_hf(tmp_path / "packed")
    packed_engine = Engine.from_pretrained(str(tmp_path / "packed"), tokenizer_path=str(tiny_model_dir))
    assert isinstance(packed_engine.model.model.layers[0].self_attn.o_proj, TernaryLinear)
    dense_engine = Engine.from_pretrained(str(tiny_model_dir), dtype="float32")
    dense_engine.update_weights(learner.named_weights())
    for params in (
        SamplingParams(max_new_tokens=10, temperature=0.0),
        SamplingParams(max_new_tokens=10, seed=1),
    ):
        packed_outs = packed_engine.generate(PROMPTS, params)
        dense_outs = dense_engine.generate(PROMPTS, params)
        assert [o.token_ids for o in packed_outs] == [o.token_ids for o in dense_outs]
        for packed_out, dense_out in zip(packed_outs, dense_outs):
            # same weights; float32 GEMMs on differently allocated buffers may differ in the last ulp
            torch.testing.assert_close(
                torch.tensor(packed_out.logprobs), torch.tensor(dense_out.logprobs), rtol=0, atol=1e-5
            )


def test_qat_with_lora_is_refused_by_the_recipe(make_learner):
    with pytest.raises(RecipeError, match=r"learner: .*lora and qat cannot be combined"):
        make_learner({"learner": {"lora": {"rank": 4}}})


@pytest.mark.parametrize(
    "settings", [{"qat": {"enabled": False}}, {"lora": {"rank": 4}, "qat": {"enabled": False}}]
)
def test_a_packed_export_is_refused_as_the_policy_without_qat_too(make_learner, tmp_path, settings):
    """Without QAT a packed model used to load as the policy with only its embeddings, norms and
    LM head trainable (the decoder's codes are buffers): training silently left the decoder
    frozen, and the RL weight sync then failed on 'unknown tensor ...q_proj.weight'."""
    from rlcpm.errors import TrainingError

    make_learner().export_hf(tmp_path / "packed")
    with pytest.raises(TrainingError, match="packed ternary"):
        make_learner({"model": {"path": str(tmp_path / "packed")}, "learner": settings})
