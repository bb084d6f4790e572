"""DPO parity: rlcpm's sigmoid / ipo / hinge losses == TRL's DPOTrainer loss at the first step,
on the same tiny model, reference model, preference batch and beta (TRL is the oracle)."""

from __future__ import annotations

import os

import pytest
import torch

from rlcpm.learner import PreferencePair
from rlcpm.learner.learner import Learner

PAIRS = [
    {"prompt": "What is 2+3?", "chosen": " 5", "rejected": " 6 apples"},
    {"prompt": "Name a color.", "chosen": " blue is nice", "rejected": " dog"},
    {"prompt": "1+1=", "chosen": "2", "rejected": "11 or so"},
    {"prompt": "Say hi", "chosen": " hi there friend", "rejected": " no"},
]


@pytest.fixture(scope="module")
def reference_model_dir(tmp_path_factory):
    from rlcpm.models.tiny import build_tiny_model_dir

    return build_tiny_model_dir(
        tmp_path_factory.mktemp("dpo") / "ref", hidden_size=32, intermediate_size=64, seed=1, init_std=0.05
    )


def _trl_loss_and_batch(policy_dir, reference_dir, loss_type: str, beta: float, tmp_path):
    os.environ.setdefault("WANDB_MODE", "disabled")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=beta,
        loss_type=[loss_type],
        per_device_train_batch_size=len(PAIRS),
        report_to="none",
        use_cpu=True,
        bf16=False,
        max_length=None,
        disable_dropout=True,
    )
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32),
        ref_model=AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32),
        args=args,
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=AutoTokenizer.from_pretrained(policy_dir),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    return loss, batch


def _pairs_from_trl_batch(batch) -> list[PreferencePair]:
    """The exact token ids TRL trained on: rows [chosen..., rejected...], completion_mask marks responses."""
    ids, attention, completion = (
        batch["input_ids"],
        batch["attention_mask"].bool(),
        batch["completion_mask"].bool(),
    )
    num_pairs = ids.shape[0] // 2
    pairs = []
    for i in range(num_pairs):
        chosen_row, rejected_row = i, i + num_pairs
        prompt = ids[chosen_row][attention[chosen_row] & ~completion[chosen_row]].tolist()
        assert prompt == ids[rejected_row][attention[rejected_row] & ~completion[rejected_row]].tolist()
        pairs.append(
            PreferencePair(
                prompt,
                ids[chosen_row][completion[chosen_row]].tolist(),
                ids[rejected_row][completion[rejected_row]].tolist(),
            )
        )
    return pairs


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_matches_trl(loss_type, make_recipe, tiny_model_dir, reference_model_dir, tmp_path):
    beta = 0.1 if loss_type != "hinge" else 2.0
    trl_loss, batch = _trl_loss_and_batch(
        str(tiny_model_dir), str(reference_model_dir), loss_type, beta, tmp_path
    )
    pairs = _pairs_from_trl_batch(batch)

    dpo = {"algorithm": {"name": "dpo", "beta": beta, "loss_type": loss_type}, "rewards": []}
    reference = Learner(make_recipe({**dpo, "model": {"path": str(reference_model_dir)}}))
    prompts = [p.prompt_token_ids for p in pairs for _ in (0, 1)]
    responses = [r for p in pairs for r in (p.chosen_token_ids, p.rejected_token_ids)]
    ref_logps = reference.sequence_logprobs(prompts, responses)
    for pair, chosen, rejected in zip(pairs, ref_logps[0::2], ref_logps[1::2]):
        pair.ref_chosen_logp, pair.ref_rejected_logp = chosen, rejected

    policy = Learner(make_recipe({**dpo, "learner": {"micro_batch_tokens": 40}}))  # several micro-batches
    metrics = policy.dpo_step(pairs)
    assert metrics["train/loss"] == pytest.approx(trl_loss, rel=1e-5)
    assert trl_loss != pytest.approx(
        {"sigmoid": 0.6931, "ipo": 25.0, "hinge": 1.0}[loss_type], rel=1e-3
    )  # not a trivial point
