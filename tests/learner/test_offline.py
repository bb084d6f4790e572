"""The offline loops end to end: SFT on arithmetic (chance -> clearly above), exact resume, DPO."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from rlcpm.config import load_recipe
from rlcpm.learner.checkpoint import list_checkpoints
from rlcpm.models import load_model
from rlcpm.trainer import train
from rlcpm.trainer.offline import train_offline

ARITHMETIC = {"style": "expression", "num_steps": 1, "digits": 1}


def _sft_recipe(run_dir, tiny_model_dir=None, **sections):
    """Single-digit one-step problems ("What is 7-3?"); eval on a held-out partition of problems."""
    model = (
        {"path": str(tiny_model_dir)}
        if tiny_model_dir
        else {
            "tiny": {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
            }
        }
    )
    base = {
        "seed": 0,
        "run_dir": str(run_dir),
        "model": {**model, "device": "cpu"},
        "data": {
            "train": {
                "task": "arithmetic",
                "num_samples": 2000,
                "seed": 0,
                "options": {**ARITHMETIC, "partition": "train"},
            },
            "eval": {
                "task": "arithmetic",
                "num_samples": 100,
                "seed": 1,
                "options": {**ARITHMETIC, "partition": "heldout"},
            },
            "apply_chat_template": False,
        },
        "algorithm": {"name": "sft", "epochs": 6, "samples_per_step": 32, "max_seq_len": 64},
        "rollout": {"max_new_tokens": 24},
        "learner": {"lr": 3e-3, "schedule": {"name": "wsd", "warmup_steps": 10, "decay_fraction": 0.2}},
        "logging": {"wandb": {"mode": "offline"}, "progress": False},
        "eval": {"num_prompts": 100},
    }
    for key, value in sections.items():
        merge = isinstance(value, dict) and key != "algorithm"  # another algorithm: a new section
        base[key] = {**base.get(key, {}), **value} if merge else value
    return load_recipe(data=base)


def test_sft_on_arithmetic_goes_from_chance_to_clearly_above(tmp_path):
    recipe = _sft_recipe(tmp_path / "sft", learner={"checkpoint": {"every_steps": 100, "keep_last": 2}})
    result = train(recipe)  # the public entry point dispatches sft to train_offline
    print(
        f"SFT arithmetic accuracy: {result.summary['eval/accuracy_before']:.2f} -> {result.summary['eval/accuracy']:.2f}"
    )
    # answers lie in 0..18: guessing gets ~5%; the untrained model gets ~0
    assert result.summary["eval/accuracy_before"] <= 0.05
    assert result.summary["eval/accuracy"] >= 0.5
    num_steps = int(result.summary["train/steps"])
    assert num_steps == 375  # ceil(6 epochs * 2000 / 32)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, num_steps + 1))
    assert rows[-1]["train/nll"] < 0.2 < rows[0]["train/nll"]
    assert [s for s, _ in list_checkpoints(result.run_dir / "checkpoints")] == [300, 375]
    final = result.final_model_dir
    assert (final / "tokenizer.json").is_file() and (final / "generation_config.json").is_file()
    assert load_model(final).config.vocab_size > 0
    assert (result.run_dir / "recipe.yaml").is_file()


def test_offline_resume_continues_exactly(tmp_path, tiny_model_dir):
    sections = {
        "algorithm": {"name": "sft", "epochs": 0.2, "samples_per_step": 16, "max_seq_len": 128},
        "learner": {"lr": 1e-3, "checkpoint": {"every_steps": 4, "keep_last": 5}},
        "data": {
            "train": {"task": "arithmetic", "num_samples": 600, "seed": 0},
            "apply_chat_template": False,
        },
    }
    straight = train_offline(_sft_recipe(tmp_path / "a", tiny_model_dir, **sections))
    assert [s for s, _ in list_checkpoints(straight.run_dir / "checkpoints")] == [4, 8]
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        straight.run_dir / "checkpoints" / "step_00000004", tmp_path / "b" / "checkpoints" / "step_00000004"
    )
    # the crashed run had logged steps 1-5; step 5 came after its last checkpoint
    rows = (straight.run_dir / "metrics.jsonl").read_text().splitlines()
    logged = [row for row in rows if json.loads(row).get("step", 0) <= 5]
    (tmp_path / "b" / "metrics.jsonl").write_text("".join(row + "\n" for row in logged))
    resumed = train_offline(_sft_recipe(tmp_path / "b", tiny_model_dir, **sections), resume=True)
    loss = lambda result: {r["step"]: r["train/loss"] for r in result.history if "train/loss" in r}
    assert loss(resumed) == {s: v for s, v in loss(straight).items() if s > 4}
    steps = [json.loads(row)["step"] for row in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == list(range(1, 9))  # step 4 kept, step 5 redone once
    a, b = load_model(straight.final_model_dir), load_model(resumed.final_model_dir)
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("precompute_ref", [True, False])
def test_dpo_on_synthetic_preferences(tmp_path, tiny_model_dir, precompute_ref):
    recipe = _sft_recipe(
        tmp_path / "dpo",
        tiny_model_dir,
        data={
            "train": {"task": "preference", "num_samples": 64, "seed": 0},
            "eval": None,
            "apply_chat_template": False,
        },
        algorithm={"name": "dpo", "beta": 0.5, "pairs_per_step": 16, "precompute_ref": precompute_ref},
        learner={"lr": 3e-3, "total_steps": 8, "checkpoint": {"every_steps": 4, "keep_last": 1}},
    )
    result = train_offline(recipe)
    rows = [r for r in result.history if "train/loss" in r]
    assert len(rows) == 8
    assert rows[0]["train/loss"] == pytest.approx(0.6931, abs=1e-3)  # pi == pi_ref at the first step
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    assert rows[-1]["train/margin"] > 0
    (checkpoint,) = [p for _, p in list_checkpoints(result.run_dir / "checkpoints")]
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    assert ("ref_logps" in state["extra"]) == precompute_ref


def test_sft_says_that_an_explicit_total_steps_is_not_used(tmp_path, tiny_model_dir, rlcpm_log):
    sections = {
        "algorithm": {"name": "sft", "epochs": 0.05, "samples_per_step": 16, "max_seq_len": 64},
        "learner": {"lr": 1e-3, "total_steps": 99},
        "data": {
            "train": {"task": "arithmetic", "num_samples": 320, "seed": 0},
            "apply_chat_template": False,
        },
        "eval": {"num_prompts": 1},
    }
    result = train_offline(_sft_recipe(tmp_path, tiny_model_dir, **sections))
    assert max(r["step"] for r in result.history) == 1  # ceil(0.05 * 320 / 16)
    assert (
        "learner.total_steps (99) is not used; the run takes ceil(epochs x rows / samples_per_step) = 1"
        in rlcpm_log.text
    )


def test_sft_with_eval_prints_its_held_out_accuracy_before_and_after_also_when_resumed(
    tmp_path, tiny_model_dir, capsys
):
    """`rlcpm train` prints the accuracy lines for SFT as for GRPO; a resumed run still knows the
    accuracy measured before its first step (it is kept in the checkpoints)."""
    from rlcpm.cli import main

    sections = {
        "algorithm": {"name": "sft", "epochs": 0.1, "samples_per_step": 16, "max_seq_len": 64},
        "learner": {"lr": 1e-3, "checkpoint": {"every_steps": 1, "keep_last": 1}},
        "data": {
            "train": {"task": "arithmetic", "num_samples": 320, "seed": 0},
            "eval": {"task": "arithmetic", "num_samples": 2, "seed": 1},
            "apply_chat_template": False,
        },
        "rollout": {"max_new_tokens": 4},
        "eval": {"num_prompts": 2},
        "logging": {"wandb": {"mode": "disabled"}, "progress": False},
    }
    recipe = _sft_recipe(tmp_path / "run", tiny_model_dir, **sections)
    path = tmp_path / "sft.yaml"
    path.write_text(recipe.to_yaml())
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy (greedy): 0.0% -> 0.0% (+0.0 points)" in out
    assert main(["train", str(path), "algorithm.epochs=0.15", "--resume"]) == 0
    assert "held-out accuracy (greedy): 0.0% -> 0.0% (+0.0 points)" in capsys.readouterr().out


def test_sft_with_data_shuffle_false_trains_on_the_rows_in_file_order(tmp_path, tiny_model_dir):
    """data.shuffle: false keeps the file's order (a curriculum) in every epoch, as GRPO's prompt
    stream does; the default shuffles each epoch."""
    from rlcpm.data import write_jsonl

    rows = [{"prompt": "Say x.", "response": " ".join(["x"] * n)} for n in range(1, 7)]
    path = write_jsonl(rows, tmp_path / "curriculum.jsonl")
    sections = {
        "algorithm": {"name": "sft", "epochs": 2, "samples_per_step": 1, "max_seq_len": 64},
        "data": {"train": str(path), "eval": None, "apply_chat_template": False, "shuffle": False},
    }
    result = train_offline(_sft_recipe(tmp_path / "run", tiny_model_dir, **sections))
    tokens = [r["train/num_tokens"] for r in result.history]
    assert tokens[:6] == sorted(tokens[:6]) and len(set(tokens[:6])) == 6, tokens
    assert tokens[6:] == tokens[:6]
    sections["data"]["shuffle"] = True
    shuffled = train_offline(_sft_recipe(tmp_path / "run2", tiny_model_dir, **sections))
    assert [r["train/num_tokens"] for r in shuffled.history][:6] != tokens[:6]


def test_resuming_a_finished_sft_run_says_to_raise_the_epochs(tmp_path, tiny_model_dir, rlcpm_log):
    sections = {
        "algorithm": {"name": "sft", "epochs": 0.1, "samples_per_step": 16, "max_seq_len": 64},
        "data": {"train": {"task": "arithmetic", "num_samples": 320, "seed": 0}, "eval": None,
                 "apply_chat_template": False},
    }  # fmt: skip
    recipe = _sft_recipe(tmp_path, tiny_model_dir, **sections)
    train(recipe)
    resumed = train(recipe, resume=True)
    assert resumed.history == []
    assert (
        "is at step 2 of the 2 this recipe takes: nothing left to train (raise algorithm.epochs"
        in rlcpm_log.text
    )
    assert "learner.total_steps" not in rlcpm_log.text


def test_offline_evaluation_runs_the_engine_as_the_rollout_settings_say(tmp_path, tiny_model_dir):
    """The held-out evaluation of an SFT run samples like a GRPO run's rollout workers: in
    rollout.dtype (it was float32 whatever the recipe said), with the learner's weights cast to it."""
    from rlcpm.learner.learner import Learner
    from rlcpm.models import load_tokenizer
    from rlcpm.trainer.offline import _Evaluator

    recipe = _sft_recipe(tmp_path / "run", tiny_model_dir, rollout={"max_new_tokens": 6, "dtype": "bfloat16"})
    evaluator = _Evaluator.maybe(recipe, load_tokenizer(tiny_model_dir), tiny_model_dir)
    assert evaluator.engine.model.dtype == torch.bfloat16
    learner = Learner(recipe, model_dir=tiny_model_dir)  # float32 weights, cast for the bfloat16 engine
    metrics = evaluator.run(learner)
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0
    assert evaluator.engine.weight_version == learner.policy_version


def test_offline_evaluation_loads_model_tokenizer(tmp_path, tiny_model_dir):
    """A model directory without tokenizer files and model.tokenizer set: the evaluation's engine
    loaded the tokenizer from the model directory and the run died setting it up."""
    from rlcpm.models import load_tokenizer
    from rlcpm.models.checkpoint import TOKENIZER_FILES
    from rlcpm.trainer.offline import _Evaluator

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    for name in TOKENIZER_FILES:
        (bare / name).unlink(missing_ok=True)
    recipe = _sft_recipe(
        tmp_path / "run", bare, model={"path": str(bare), "device": "cpu", "tokenizer": str(tiny_model_dir)}
    )
    evaluator = _Evaluator.maybe(recipe, load_tokenizer(tiny_model_dir), bare)
    assert evaluator.engine.tokenizer is not None


def test_the_final_export_carries_the_recipes_chat_template(tmp_path, tiny_model_dir):
    """model.chat_template renders the training prompts, so run_dir/final must hold it: it held the
    source's template, and a GRPO run from the export rendered prompts unlike its SFT."""
    from rlcpm.models import load_tokenizer

    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    sections = {
        "model": {"path": str(tiny_model_dir), "device": "cpu", "chat_template": template},
        "algorithm": {"name": "sft", "epochs": 0.05, "samples_per_step": 16, "max_seq_len": 256},
        "data": {"train": {"task": "arithmetic", "num_samples": 320, "seed": 0}, "eval": None},
    }
    result = train_offline(_sft_recipe(tmp_path, tiny_model_dir, **sections))
    assert load_tokenizer(result.final_model_dir).chat_template == template


def test_the_final_export_carries_the_tokenizer_the_run_trained_with(tmp_path, tiny_model_dir, monkeypatch):
    """With model.tokenizer set, run_dir/final holds that tokenizer's files (they were overwritten by
    the model directory's own), and still the model's generation config. `~` in model.tokenizer is
    the home directory, as in model.path (the preflight accepted it, then loading failed)."""
    from rlcpm.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    monkeypatch.setenv("HOME", str(tmp_path))
    sections = {
        "model": {"path": str(tiny_model_dir), "device": "cpu", "tokenizer": "~/tokenizer"},
        "algorithm": {"name": "sft", "epochs": 0.05, "samples_per_step": 16, "max_seq_len": 256},
        "data": {"train": {"task": "arithmetic", "num_samples": 320, "seed": 0}, "eval": None},
    }
    final = train_offline(_sft_recipe(tmp_path / "run", tiny_model_dir, **sections)).final_model_dir
    assert load_tokenizer(final).chat_template == tokenizer.chat_template
    generation_config = "generation_config.json"
    assert (final / generation_config).read_text() == (tiny_model_dir / generation_config).read_text()


def test_offline_prompts_are_tokenised_as_the_grpo_loop_gives_them_to_the_engine(tiny_model_dir):
    """A raw prompt (data.apply_chat_template: false) gets the tokenizer's BOS, as GRPO's rollouts
    see it; SFT / DPO trained it without, so an SFT warm-up learned a context RL never shows. A
    rendered chat template holds its own special tokens: no BOS added."""
    from tokenizers.processors import TemplateProcessing

    from rlcpm.data.example import Example
    from rlcpm.learner.offline_data import tokenize_demonstrations, tokenize_preferences
    from rlcpm.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    bos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )  # a Llama-style tokenizer that adds a BOS
    raw = Example("raw", "What is 2+2?", response="4", chosen="4", rejected="5")
    messages = [{"role": "user", "content": "What is 2+2?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat = Example("chat", rendered, messages, response="4", chosen="4", rejected="5")
    for tokenize in (tokenize_demonstrations, tokenize_preferences):
        (raw_item, chat_item), _ = tokenize([raw, chat], tokenizer, 64)
        assert raw_item.prompt_token_ids == tokenizer.encode(raw.prompt)  # GRPO's RLLoop.tokenize
        assert raw_item.prompt_token_ids[0] == bos
        assert chat_item.prompt_token_ids == tokenizer.encode(chat.prompt, add_special_tokens=False)


def test_a_resume_with_more_epochs_trains_its_first_step_at_the_new_schedules_rate(tmp_path, tiny_model_dir):
    """Raising algorithm.epochs to continue a finished run: the first resumed update ran at the rate
    the checkpoint's optimizer held (the old schedule's end, 0 for cosine), not the new schedule's."""
    from rlcpm.learner.schedules import lr_multiplier

    def recipe(epochs):
        sections = {
            "algorithm": {"name": "sft", "epochs": epochs, "samples_per_step": 16, "max_seq_len": 64},
            "learner": {"lr": 1e-3, "schedule": {"name": "cosine"}},
            "data": {"train": {"task": "arithmetic", "num_samples": 320, "seed": 0}, "eval": None,
                     "apply_chat_template": False},
        }  # fmt: skip
        return _sft_recipe(tmp_path, tiny_model_dir, **sections)

    assert [r["train/lr"] for r in train(recipe(0.1)).history][-1] == 0.0  # 2 steps, decayed to 0
    longer = recipe(0.4)  # 8 steps
    lrs = [r["train/lr"] for r in train(longer, resume=True).history]
    expected = [1e-3 * lr_multiplier(step, longer.learner.schedule, 8) for step in range(3, 9)]
    assert lrs == pytest.approx(expected, rel=1e-9)


def test_offline_evaluation_at_eval_temperature_0_is_greedy(tmp_path, tiny_model_dir):
    """eval: {greedy: false, temperature: 0} means greedy (EvalConfig), as in a GRPO run: a 0
    was taken for "unset" and the evaluation sampled at the rollout temperature."""
    from rlcpm.learner.learner import Learner
    from rlcpm.models import load_tokenizer
    from rlcpm.trainer.offline import _Evaluator

    recipe = _sft_recipe(
        tmp_path / "run",
        tiny_model_dir,
        rollout={"max_new_tokens": 4, "temperature": 1.0},
        eval={"num_prompts": 2, "greedy": False, "temperature": 0.0},
    )
    evaluator = _Evaluator.maybe(recipe, load_tokenizer(tiny_model_dir), tiny_model_dir)
    seen = []
    generate = evaluator.engine.generate
    evaluator.engine.generate = lambda prompts, params: seen.append(params) or generate(prompts, params)
    evaluator.run(Learner(recipe, model_dir=tiny_model_dir))
    assert {p.temperature for p in seen[0]} == {0.0}


def test_sampled_offline_evaluation_draws_each_prompt_with_its_own_seed(tmp_path, tiny_model_dir):
    """eval.greedy: false: every prompt had the same seed, so the same uniforms picked every
    prompt's tokens (one draw shared by the whole evaluation, not one per prompt as in GRPO's)."""
    from rlcpm.learner.learner import Learner
    from rlcpm.models import load_tokenizer
    from rlcpm.trainer.offline import _Evaluator

    recipe = _sft_recipe(
        tmp_path / "run",
        tiny_model_dir,
        rollout={"max_new_tokens": 2},
        eval={"num_prompts": 3, "greedy": False},
    )
    evaluator = _Evaluator.maybe(recipe, load_tokenizer(tiny_model_dir), tiny_model_dir)
    seen = []
    generate = evaluator.engine.generate
    evaluator.engine.generate = lambda prompts, params: seen.append(params) or generate(prompts, params)
    evaluator.run(Learner(recipe, model_dir=tiny_model_dir))
    assert isinstance(seen[0], list) and len({p.seed for p in seen[0]}) == 3


def test_offline_evaluation_raises_when_the_engine_refuses_its_requests(tmp_path, tiny_model_dir):
    """Requests the engine refuses (here a stop token id outside the vocabulary) come back empty
    with finish_reason "aborted": they were scored as wrong answers (accuracy 0.0, silently)
    where GRPO's evaluation raises."""
    from rlcpm.errors import TrainingError
    from rlcpm.learner.learner import Learner
    from rlcpm.models import load_tokenizer
    from rlcpm.trainer.offline import _Evaluator

    recipe = _sft_recipe(
        tmp_path / "run", tiny_model_dir, rollout={"max_new_tokens": 2, "stop_token_ids": [10**6]}
    )
    evaluator = _Evaluator.maybe(recipe, load_tokenizer(tiny_model_dir), tiny_model_dir)
    with pytest.raises(TrainingError, match="refused 100 of 100 requests: stop token id 1000000 is outside"):
        evaluator.run(Learner(recipe, model_dir=tiny_model_dir))


def test_a_data_parallel_run_that_fails_starting_up_releases_its_learner_ranks(
    ray_session, tmp_path, tiny_model_dir
):
    """An error after the learner ranks started (here a malformed data.eval file, read once
    they exist) left them to the garbage collector: while the traceback lives (a notebook keeps
    the last one) they held a CPU each, and a Ray the run started was never shut down."""
    import time

    from rlcpm.errors import RlcpmError

    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text('{"prompt": "1+1", "answer": "2"}\nnot json\n')
    recipe = _sft_recipe(
        tmp_path / "run",
        tiny_model_dir,
        data={"eval": str(eval_file)},
        algorithm={"name": "sft", "epochs": 0.1, "samples_per_step": 16, "max_seq_len": 64},
        learner={"data_parallel": 2},
    )
    free_cpus = ray_session.available_resources().get("CPU", 0)
    with pytest.raises(RlcpmError, match="eval.jsonl") as failure:  # kept, as a notebook does
        train_offline(recipe)
    deadline = time.monotonic() + 30
    while ray_session.available_resources().get("CPU", 0) < free_cpus and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_session.available_resources().get("CPU", 0) >= free_cpus, failure
