"""`Learner` on a tiny model: on-policy ratios, micro-batching invariance, KL reference, LoRA, weights."""

from __future__ import annotations

import pytest
import torch

from rlcpm.errors import TrainingError
from rlcpm.learner import RLBatch
from rlcpm.learner.learner import Learner
from rlcpm.models import load_model


def _capture_gradients(learner: Learner) -> dict[str, torch.Tensor]:
    """Read the accumulated gradients just before each optimizer step (a step pre-hook)."""
    captured: dict[str, torch.Tensor] = {}

    def hook(optimizer, args, kwargs):
        for name, param in learner.root.named_parameters():
            if param.grad is not None:
                captured[name] = param.grad.detach().clone()

    learner.optimizer.register_step_pre_hook(hook)
    return captured


def test_first_update_on_policy_has_unit_ratio_and_no_clipping(make_recipe, make_rl_batch):
    learner = Learner(make_recipe({"rollout": {"temperature": 0.8}}))
    batch = make_rl_batch(learner)
    metrics = learner.train_step(batch)
    assert metrics["train/ratio_mean"] == 1.0 and metrics["train/ratio_max"] == 1.0
    assert (
        metrics["train/clip_frac_low"]
        == metrics["train/clip_frac_high"]
        == metrics["train/dual_clip_frac"]
        == 0.0
    )
    assert metrics["train/num_tokens"] == batch.num_loss_tokens
    assert learner.step == learner.policy_version == 1
    # the policy moved: the same tokens now have other log-probs (ratio != 1 on a second pass)
    assert learner.train_step(batch)["train/ratio_max"] != 1.0


def test_lora_dropout_does_not_touch_the_on_policy_ratio(make_recipe, make_rl_batch):
    # With dropout in the update's forward, the ratio compared another function than the
    # sampler's (1 +- 1e-2 on-policy); a GRPO learner runs without dropout.
    learner = Learner(make_recipe({"learner": {"lr": 1e-2, "lora": {"rank": 4, "dropout": 0.5}}}))
    learner.train_step(make_rl_batch(learner, seed=1))  # B != 0 from here: dropout would matter
    metrics = learner.train_step(make_rl_batch(learner, seed=2))  # fresh behaviour log-probs
    assert metrics["train/ratio_mean"] == 1.0 and metrics["train/ratio_max"] == 1.0


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_gradient_accumulation_invariance(make_recipe, make_rl_batch, agg):
    """One packed micro-batch == many (a 24-token budget), gradients to 1e-6 relative."""
    grads = []
    for budget in (4096, 24):
        recipe = make_recipe(
            {"learner": {"micro_batch_tokens": budget}, "algorithm": {"loss_agg": agg, "kl_coef": 0.05}}
        )
        learner = Learner(recipe)
        batch = make_rl_batch(learner, num_groups=3, seed=1)
        batch.sequences[2].is_loss_masked = True  # an overlong-filtered response
        captured = _capture_gradients(learner)
        learner.train_step(batch)
        grads.append(captured)
    one, many = grads
    assert one.keys() == many.keys() and len(one) > 0
    for name in one:
        torch.testing.assert_close(many[name], one[name], rtol=1e-6, atol=1e-6 * one[name].abs().max().item())


def test_onednn_linears_give_the_default_gemms_gradients(make_recipe, make_rl_batch):
    """learner.cpu_gemm: onednn (the CPU default) == PyTorch's default GEMM, to float32 rounding."""
    from rlcpm.kernels.cpu_gemm import OneDNNLinear, onednn_available

    if not onednn_available():
        pytest.skip("PyTorch built without oneDNN")
    grads, losses = [], []
    for gemm in ("default", "onednn"):
        learner = Learner(make_recipe({"learner": {"cpu_gemm": gemm}, "algorithm": {"kl_coef": 0.05}}))
        kinds = {type(m) for m in learner.policy.modules() if isinstance(m, torch.nn.Linear)}
        assert kinds == ({OneDNNLinear} if gemm == "onednn" else {torch.nn.Linear})
        captured = _capture_gradients(learner)
        losses.append(learner.train_step(make_rl_batch(learner, num_groups=3, seed=2))["train/loss"])
        grads.append(captured)
    default, onednn = grads
    assert default.keys() == onednn.keys() and len(default) > 0
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-7)
    for name in default:
        torch.testing.assert_close(
            onednn[name], default[name], rtol=1e-4, atol=1e-5 * default[name].abs().max().item()
        )


def test_shared_prompts_give_the_same_logprobs_and_gradients(make_recipe, make_rl_batch):
    """Packing a group's prompt once (learner.share_prompts) changes only the work done."""
    results = []
    for share in (True, False):
        learner = Learner(make_recipe({"learner": {"share_prompts": share}}))
        assert learner.shares_prompts is share
        batch = make_rl_batch(learner, num_groups=3, seed=2)
        logprobs = learner.compute_logprobs(batch)
        captured = _capture_gradients(learner)
        learner.train_step(batch)
        results.append((logprobs, captured))
    (lp_shared, grads_shared), (lp_plain, grads_plain) = results
    torch.testing.assert_close(
        torch.tensor(sum(lp_shared, [])), torch.tensor(sum(lp_plain, [])), rtol=0, atol=1e-5
    )
    for name in grads_plain:
        scale = grads_plain[name].abs().max().item()
        torch.testing.assert_close(grads_shared[name], grads_plain[name], rtol=1e-5, atol=1e-6 * scale)


def test_prompts_are_not_shared_under_an_attention_backend_without_support(make_recipe):
    learner = Learner(make_recipe({"model": {"attention": "sparse"}}))
    assert not learner.shares_prompts


def test_loss_masked_responses_get_no_gradient(make_recipe, make_rl_batch):
    learner = Learner(make_recipe())
    batch = make_rl_batch(learner, num_groups=1)
    for seq in batch.sequences:
        seq.is_loss_masked = True
    captured = _capture_gradients(learner)
    metrics = learner.train_step(batch)
    assert metrics.get("train/num_tokens", 0.0) == 0.0
    assert all(g.abs().max() == 0 for g in captured.values())


def test_kl_reference_is_initial_policy_and_refreshes(make_recipe, make_rl_batch):
    recipe = make_recipe({"algorithm": {"kl_coef": 0.1, "ref_refresh_every": 2}})
    learner = Learner(recipe)
    batch = make_rl_batch(learner)
    assert learner.train_step(batch)["train/kl"] == 0.0  # pi_theta == pi_ref before the first update
    initial = learner.compute_logprobs(batch, reference=True)
    metrics = learner.train_step(make_rl_batch(learner, seed=3))
    assert metrics["train/kl"] > 0.0
    # after step 2 the reference was refreshed to the current policy
    assert learner.compute_logprobs(batch, reference=True) == learner.compute_logprobs(batch)
    assert learner.compute_logprobs(batch, reference=True) != initial


def test_kl_reference_matches_untrained_model(make_recipe, make_rl_batch):
    learner = Learner(make_recipe({"algorithm": {"kl_coef": 0.1}}))
    batch = make_rl_batch(learner)
    before = learner.compute_logprobs(batch)
    learner.train_step(batch)
    assert learner.compute_logprobs(batch, reference=True) == before
    assert learner.compute_logprobs(batch) != before


def test_lora_reference_is_base_model_and_export_merges(make_recipe, make_rl_batch, tmp_path):
    lora = {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj", "down_proj"]}
    learner = Learner(make_recipe({"learner": {"lora": lora, "lr": 1e-2}, "algorithm": {"kl_coef": 0.1}}))
    trainable = {n for n, p in learner.root.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    batch = make_rl_batch(learner)
    base = learner.compute_logprobs(batch)
    for _ in range(2):
        learner.train_step(batch)
    assert learner.compute_logprobs(batch, reference=True) == base  # adapters disabled == base model
    trained = learner.compute_logprobs(batch)
    assert trained != base

    exported = learner.export_hf(tmp_path / "merged")
    assert any(".lora_" in n for n, _ in learner.policy.named_parameters())  # not merged in place
    merged = load_model(exported)
    prompts = [s.prompt_token_ids for s in batch.sequences]
    responses = [s.response_token_ids for s in batch.sequences]
    with torch.no_grad():
        for i in range(3):
            ids = torch.tensor(prompts[i] + responses[i])
            logits = merged(ids[None])[0, len(prompts[i]) - 1 : -1]
            expected = logits.log_softmax(-1).gather(1, ids[len(prompts[i]) :, None]).squeeze(1)
            torch.testing.assert_close(torch.tensor(trained[i]), expected, rtol=1e-5, atol=1e-5)


def test_weight_buckets_carry_hf_names_and_respect_the_budget(make_recipe, tiny_model_dir):
    learner = Learner(make_recipe())
    reference = dict(load_model(tiny_model_dir).named_parameters())
    buckets = list(learner.weight_buckets(bucket_bytes=20_000))
    assert len(buckets) > 1
    for bucket in buckets:
        sizes = [t.numel() * t.element_size() for _, t in bucket]
        assert len(bucket) == 1 or sum(sizes) <= 20_000
    streamed = {name: tensor for bucket in buckets for name, tensor in bucket}
    assert streamed.keys() == reference.keys()
    for name, tensor in streamed.items():
        assert torch.equal(tensor, reference[name].detach())
    half = next(iter(learner.weight_buckets(dtype=torch.bfloat16)))
    assert half[0][1].dtype == torch.bfloat16


def test_sft_step_lowers_nll(make_recipe):
    from rlcpm.learner import SFTSequence

    learner = Learner(make_recipe({"algorithm": {"name": "sft"}, "rewards": [], "learner": {"lr": 1e-2}}))
    examples = [SFTSequence([5, 6, 7], [8, 9, 10, 11]), SFTSequence([12, 13], [14, 15])]
    first = learner.sft_step(examples)["train/nll"]
    for _ in range(5):
        last = learner.sft_step(examples)["train/nll"]
    assert last < first - 0.5


def test_engine_samples_are_on_policy_and_weights_stream_back(make_recipe, tiny_model_dir):
    """The engine's behaviour log-probs (top-p, temperature) are the learner's; after an update,
    streamed weights make the engine agree with the learner again."""
    from itertools import chain

    from rlcpm.learner import RLSequence
    from rlcpm.rollout import Engine, SamplingParams

    learner = Learner(make_recipe({"rollout": {"temperature": 0.8, "top_p": 0.9, "top_k": 50}}))
    engine = Engine.from_pretrained(str(tiny_model_dir), dtype="float32")
    params = SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, top_k=50, seed=0, ignore_eos=True)
    prompts = [[11, 12, 13, 14], [21, 22, 23], [31, 32, 33, 34, 35]]

    def rollout():
        outs = engine.generate(prompts, params)
        return [
            RLSequence(p, list(o.token_ids), list(o.logprobs), advantage=a)
            for p, o, a in zip(prompts, outs, (1.0, -1.0, 0.5))
        ]

    batch = RLBatch(rollout())
    learner_logprobs = learner.compute_logprobs(batch)
    for seq, mine in zip(batch.sequences, learner_logprobs):
        torch.testing.assert_close(
            torch.tensor(mine), torch.tensor(seq.behaviour_logprobs), rtol=0, atol=1e-5
        )
    metrics = learner.train_step(batch)
    assert metrics["train/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["train/clip_frac_low"] == metrics["train/clip_frac_high"] == 0.0

    engine.update_weights(chain.from_iterable(learner.weight_buckets(bucket_bytes=50_000)), version=1)
    batch = RLBatch(rollout())
    for seq, mine in zip(batch.sequences, learner.compute_logprobs(batch)):
        torch.testing.assert_close(
            torch.tensor(mine), torch.tensor(seq.behaviour_logprobs), rtol=0, atol=1e-5
        )


@pytest.mark.parametrize(
    "lora", [None, {"rank": 4, "alpha": 16.0, "targets": ["q_proj", "v_proj", "up_proj"]}]
)
def test_dpo_with_on_the_fly_reference_learns_the_preference(make_recipe, lora):
    """precompute_ref: false keeps pi_ref (a frozen copy, or the adapter-free base with LoRA) and
    scores pairs as they come; the first loss is log 2 (pi == pi_ref), then preferences are learned."""
    import math

    from rlcpm.learner import PreferencePair

    learner_cfg = {"lr": 2e-2, **({"lora": lora} if lora else {})}
    recipe = make_recipe(
        {
            "algorithm": {"name": "dpo", "beta": 0.5, "precompute_ref": False},
            "rewards": [],
            "learner": learner_cfg,
        }
    )
    learner = Learner(recipe)
    assert learner.reference is not None and (learner.reference.frozen is None) == (lora is not None)
    pairs = lambda: [
        PreferencePair([5, 6, 7], [8, 9], [10, 11, 12]),
        PreferencePair([13, 14], [15], [16, 17]),
    ]
    first = learner.dpo_step(pairs())
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    for _ in range(6):
        last = learner.dpo_step(pairs())
    assert last["train/loss"] < first["train/loss"] - 0.1
    assert last["train/accuracy"] == 1.0 and last["train/margin"] > 0


def test_dpo_with_precomputed_reference_refuses_pairs_without_it_after_the_first_step(make_recipe):
    """With precompute_ref (the default) pi_ref is the initial policy, which only exists before
    the first update: later pairs without reference log-probs were scored under the TRAINED policy
    as pi_ref (a loss of log 2 on every new pair, nothing learned); now a TrainingError."""
    from rlcpm.learner import PreferencePair

    recipe = make_recipe({"algorithm": {"name": "dpo", "beta": 0.5}, "rewards": []})
    learner = Learner(recipe)
    learner.dpo_step([PreferencePair([5, 6, 7], [8, 9], [10, 11, 12])])  # step 0: pi == pi_ref, filled
    scored = PreferencePair([13, 14], [15], [16, 17], ref_chosen_logp=-3.0, ref_rejected_logp=-4.0)
    learner.dpo_step([scored])
    with pytest.raises(TrainingError, match="precompute_ref"):
        learner.dpo_step([PreferencePair([13, 14], [15], [16, 17])])


def test_a_skipped_step_advances_the_schedule_like_a_trained_one(make_recipe, make_rl_batch):
    """A step where no group passed dynamic sampling trains nothing, but the LR schedule moves on:
    it stays a function of the run's step and the last update still runs at the decayed rate."""
    schedule = {"name": "wsd", "warmup_steps": 0, "decay_fraction": 0.5, "decay_form": "linear"}
    recipe = make_recipe({"learner": {"total_steps": 4, "schedule": schedule}})
    trained, skipping = Learner(recipe), Learner(recipe)
    batch = make_rl_batch(trained)
    for step in range(4):
        assert skipping.lr == trained.lr  # the rate the next update (or skip) runs at
        trained.train_step(batch)
        if step % 2 == 0:
            lr = skipping.lr
            assert skipping.skip_step() == {"train/lr": lr}
        else:
            skipping.train_step(batch)
        assert skipping.step == trained.step == step + 1
    assert skipping.policy_version == 2 and trained.policy_version == 4
    assert skipping.lr == trained.lr == 0.0


@pytest.mark.parametrize("source, setting, exported", [
    (torch.bfloat16, "auto", torch.bfloat16),  # the checkpoint's dtype, not the float32 master weights'
    (torch.float32, "bfloat16", torch.bfloat16),  # model.dtype, as the engines sample
    (torch.float32, "auto", torch.float32),
])  # fmt: skip
def test_the_final_export_is_in_the_checkpoints_dtype(make_recipe, tmp_path, source, setting, exported):
    from rlcpm.models.tiny import build_tiny_model_dir

    model_dir = build_tiny_model_dir(tmp_path / "source", hidden_size=32, intermediate_size=64, dtype=source)
    learner = Learner(make_recipe({"model": {"path": str(model_dir), "dtype": setting}}))
    assert all(p.dtype == torch.float32 for p in learner.policy.parameters())  # master weights
    final = load_model(learner.export_hf(tmp_path / "final"))
    assert final.dtype == exported
    for name, latent in learner.latent_weights():
        assert torch.equal(dict(final.named_parameters())[name], latent.to(exported))


def test_token_ids_outside_the_vocabulary_are_named(make_recipe):
    """A tokenizer with more ids than the model's embedding crashed SFT / DPO / GRPO steps with
    torch's 'RuntimeError: index 512 is out of bounds' (a device-side assert on a GPU)."""
    from rlcpm.learner import SFTSequence

    learner = Learner(make_recipe({}))
    vocab_size = learner.policy.config.vocab_size
    with pytest.raises(
        TrainingError, match=rf"sequence 1: token id {vocab_size} is outside .*{vocab_size}\)"
    ):
        learner.sft_step([SFTSequence([1, 2], [3]), SFTSequence([1, 2], [3, vocab_size])])
    with pytest.raises(TrainingError, match="token id -1 is outside"):
        learner.response_logprobs([[1, -1]], [[3]])
    assert learner.step == 0
