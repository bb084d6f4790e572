"""A run fails in a second, with the fix named, when its recipe names what is not there or its
run_dir holds another run's checkpoints (no Ray started); a changed `model.tiny` rebuilds."""

from __future__ import annotations

import json

import pytest

from rlcpm.config import load_recipe
from rlcpm.errors import CheckpointError, DataError, RecipeError, RewardError, TrainingError
from rlcpm.learner.checkpoint import STATE_FILE, checkpoint_path
from rlcpm.learner.model_source import TINY_MODEL_DIR, resolve_model_dir
from rlcpm.models import build_tiny_model_dir
from rlcpm.trainer import train
from rlcpm.trainer.preflight import check_run

TINY = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64}  # fmt: skip


def recipe(run_dir, **over):
    base = {
        "run_dir": str(run_dir),
        "model": {"tiny": TINY, "device": "cpu"},
        "data": {"train": {"task": "arithmetic", "num_samples": 8}},
        "rewards": [{"name": "math"}],
        "learner": {"total_steps": 3},
        "logging": {"wandb": {"mode": "disabled"}},
    }
    return load_recipe(data=base, overrides=[f"{k}={json.dumps(v)}" for k, v in over.items()])


def fake_checkpoint(run_dir, step):
    path = checkpoint_path(run_dir / "checkpoints", step)
    path.mkdir(parents=True)
    (path / STATE_FILE).write_bytes(b"")


def test_a_fresh_run_refuses_a_run_dir_with_checkpoints(tmp_path):
    fake_checkpoint(tmp_path, 2)
    with pytest.raises(TrainingError, match=r"step_00000002\); continue it with --resume"):
        train(recipe(tmp_path))  # raises before Ray or a model starts
    check_run(recipe(tmp_path), resume=True)  # resuming it is fine


@pytest.mark.parametrize("not_a_recipe", ["recipes/quickstart.yaml", {"model": {"tiny": TINY}}])
def test_train_given_a_path_or_a_dict_says_to_load_the_recipe(not_a_recipe):
    """It crashed with AttributeError: 'str' object has no attribute 'logging'."""
    with pytest.raises(RecipeError, match=r"train\(\) takes a Recipe.*rlcpm.load_recipe"):
        train(not_a_recipe)


def test_resume_warns_when_there_is_nothing_to_resume_or_nothing_left(tmp_path, rlcpm_log):
    caplog = rlcpm_log
    check_run(recipe(tmp_path), resume=True)
    assert "no checkpoint under" in caplog.text
    fake_checkpoint(tmp_path, 3)
    check_run(recipe(tmp_path), resume=True)
    assert "nothing left to train" in caplog.text


def test_resume_of_sft_does_not_judge_its_progress_by_learner_total_steps(tmp_path, rlcpm_log):
    """SFT takes ceil(epochs x rows / samples_per_step) steps, not learner.total_steps (100 by
    default): a checkpoint at step 150 may well have steps left (the offline loop says when not)."""
    fake_checkpoint(tmp_path, 150)
    check_run(recipe(tmp_path, algorithm={"name": "sft", "epochs": 2}), resume=True)
    assert "nothing left to train" not in rlcpm_log.text


def test_missing_model_tokenizer_data_and_rewards_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="model directory not found: /nope"):
        check_run(recipe(tmp_path, model={"path": "/nope"}), False)
    with pytest.raises(DataError, match="model.tokenizer: directory not found: /nope"):
        check_run(recipe(tmp_path, **{"model.tokenizer": "/nope"}), False)
    with pytest.raises(DataError, match="data.train: dataset path not found"):
        check_run(recipe(tmp_path, **{"data.train": str(tmp_path / "none.jsonl")}), False)
    with pytest.raises(DataError, match=r"data.train: synthetic task 'arithmetic': unknown option\(s\) \['digitz'\]"):
        check_run(recipe(tmp_path, **{"data.train.options": {"digitz": 2}}), False)
    with pytest.raises(RewardError, match="did you mean 'math'"):
        check_run(recipe(tmp_path, rewards=[{"name": "mathh"}]), False)


def test_a_missing_speculative_draft_or_frspec_vocab_is_named_before_ray(tmp_path):
    """Not a traceback from every rollout worker half a minute in."""
    with pytest.raises(CheckpointError, match="rollout.speculative.draft: model directory not found: /nope"):
        check_run(recipe(tmp_path, **{"rollout.speculative": {"draft": "/nope"}}), False)
    draft = build_tiny_model_dir(tmp_path / "draft", hidden_size=16, num_hidden_layers=1)
    missing_vocab = {"draft": str(draft), "frspec_vocab": "/nope.json"}
    with pytest.raises(DataError, match="rollout.speculative.frspec_vocab: file not found: /nope.json"):
        check_run(recipe(tmp_path, **{"rollout.speculative": missing_vocab}), False)


def test_a_draft_with_another_vocabulary_size_is_named_before_ray(tmp_path):
    """The rollout workers refused it, each with a Ray traceback, once Ray had started."""
    target = build_tiny_model_dir(tmp_path / "target", hidden_size=16, num_hidden_layers=1)
    draft = build_tiny_model_dir(tmp_path / "draft", hidden_size=16, num_hidden_layers=1, vocab_size=1024)
    over = {"model.tiny": None, "model.path": str(target), "rollout.speculative": {"draft": str(draft)}}
    with pytest.raises(CheckpointError, match="speculative.draft: its vocabulary has 1024 ids, model"):
        check_run(recipe(tmp_path / "run", **over), False)
    over["rollout.speculative"] = {"draft": str(target)}
    check_run(recipe(tmp_path / "run", **over), False)


def test_model_path_and_tiny_together_and_a_negative_eval_temperature_are_recipe_errors(tmp_path):
    with pytest.raises(RecipeError, match="not both"):
        recipe(tmp_path, **{"model.path": str(tmp_path)})
    with pytest.raises(RecipeError, match="eval.temperature"):
        recipe(tmp_path, **{"eval.temperature": -1})


def test_a_changed_tiny_model_is_rebuilt_unless_checkpoints_hold_the_old_one(tmp_path):
    first = resolve_model_dir(recipe(tmp_path).model, tmp_path)
    assert first == tmp_path / TINY_MODEL_DIR
    assert json.loads((first / "config.json").read_text())["hidden_size"] == 16
    wider = recipe(tmp_path, **{"model.tiny.hidden_size": 32}).model
    assert json.loads((resolve_model_dir(wider, tmp_path) / "config.json").read_text())["hidden_size"] == 32
    fake_checkpoint(tmp_path, 1)
    with pytest.raises(TrainingError, match=r"differs .* \(hidden_size\)"):
        resolve_model_dir(recipe(tmp_path).model, tmp_path)
    assert resolve_model_dir(wider, tmp_path) == first  # the settings it was built with still load


def test_evaluation_raises_when_the_engine_refused_requests_instead_of_scoring_them_as_wrong(tmp_path):
    from types import SimpleNamespace

    from rlcpm.data.example import Example
    from rlcpm.rollout import RequestOutput
    from rlcpm.trainer.evaluation import evaluate

    class RefusingPool:  # what the rollout workers return for a request the engine rejects
        def generate_plain(self, prompts, params):
            return [
                RequestOutput(i, p, [], [], "aborted", 0, error="prompt is longer than the context")
                for i, p in enumerate(prompts)
            ]

    examples = [Example(id="e0", prompt="1+1=")]
    with pytest.raises(TrainingError, match="refused 1 of 1 requests: prompt is longer than the context"):
        evaluate(recipe(tmp_path), RefusingPool(), SimpleNamespace(terms=[]), examples, lambda e: [1, 2], str)


def test_evaluation_with_every_sample_dropped_reports_no_accuracy_instead_of_failing(tmp_path, rlcpm_log):
    """A reward with on_error: drop that fails on every eval sample left nothing to average: the
    accuracy lookup raised KeyError('eval/accuracy') and the run died at its first evaluation."""
    from types import SimpleNamespace

    from rlcpm.data.example import Example
    from rlcpm.rewards import RewardResult
    from rlcpm.rollout import RequestOutput
    from rlcpm.trainer.evaluation import evaluate

    class Pool:
        def generate_plain(self, prompts, params):
            return [RequestOutput(i, p, [5, 6], [-1.0, -1.0], "stop", 0) for i, p in enumerate(prompts)]

    class DroppingRewards:
        terms = [SimpleNamespace(label="math")]

        def score(self, samples):
            return [RewardResult(0.0, dropped=True, error="timed out") for _ in samples]

    examples = [Example(id="e0", prompt="1+1="), Example(id="e1", prompt="2+2=")]
    metrics = evaluate(recipe(tmp_path), Pool(), DroppingRewards(), examples, lambda e: [1, 2], str)
    assert "eval/accuracy" not in metrics and "eval/greedy/accuracy" not in metrics
    assert "eval/reward_mean" not in metrics  # not a 0.0 mean over no sample
    assert metrics["eval/response_len_mean"] == 2.0
    assert "eval: every one of 2 samples was dropped by the rewards" in rlcpm_log.text


def test_an_unreachable_ray_address_fails_at_once():
    import socket
    import time

    from rlcpm.trainer.cluster import check_reachable

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(TrainingError, match=rf"cluster.address 127.0.0.1:{port}: no connection"):
        check_reachable(f"127.0.0.1:{port}")
    assert time.perf_counter() - start < 5
    check_reachable("auto")  # left to Ray


def test_a_local_ray_has_a_cpu_for_every_actor_of_the_run(monkeypatch, tmp_path):
    """Learner ranks and rollout workers reserve one CPU each: a local Ray sized by the machine
    (at least 4) left the fourth rollout worker of a 2-core machine waiting for a CPU forever,
    and the run hung silently in its start-up."""
    import os

    import ray

    from rlcpm.config import ClusterConfig
    from rlcpm.trainer import rl_loop
    from rlcpm.trainer.cluster import ensure_ray

    def no_ray(cluster, actor_cpus=0):
        raise RuntimeError(f"actor_cpus={actor_cpus}")

    monkeypatch.setattr(rl_loop, "ensure_ray", no_ray)
    grpo = recipe(tmp_path / "run", **{"rollout.workers": 4, "learner.data_parallel": 2})
    with pytest.raises(RuntimeError, match="actor_cpus=6"):
        rl_loop.GRPOTrainer(grpo)

    started = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: started.update(kwargs))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert ensure_ray(ClusterConfig(), actor_cpus=5)
    assert started["num_cpus"] == 5
    ensure_ray(ClusterConfig(num_cpus=6), actor_cpus=5)
    assert started["num_cpus"] == 6


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"kernel_size": 6, "kernel_stride": 3, "block_size": 12, "window_size": 24, "topk": 4},
         r"KV block_size \(16\) must be a multiple or a divisor of each compression stride"),
        ({"window_size": 40, "block_size": 16, "kernel_size": 8, "kernel_stride": 4},
         r"window_size \(40\) must be a multiple of block_size \(16\)"),
        ({"topk": 1}, r"topk \(1\) must be >= init_blocks \+ 1"),
    ],
)  # fmt: skip
def test_sparse_settings_that_fail_together_are_refused_before_ray(tmp_path, settings, message):
    bad = recipe(tmp_path, **{"model.attention": "sparse", "model.sparse_attention": settings})
    with pytest.raises(RecipeError, match=r"model\.sparse_attention: .*" + message):
        check_run(bad, resume=False)


def test_sparse_settings_are_checked_over_the_checkpoints_own(tmp_path):
    """A partial model.sparse_attention is merged over the checkpoint's sparse_config: a window
    of 48 fits the checkpoint's block of 16 (MiniCPM4's default block of 64 would not)."""
    from rlcpm.models.tiny import build_tiny_model_dir

    small = {"kernel_size": 8, "kernel_stride": 4, "block_size": 16, "window_size": 32, "topk": 4}
    path = build_tiny_model_dir(tmp_path / "m", "minicpm", sparse_config=small)

    def with_window(window):
        model = {"path": str(path), "device": "cpu", "attention": "sparse", "sparse_attention": {"window_size": window}}
        return load_recipe(data={"run_dir": str(tmp_path / "run"), "model": model,
                                 "data": {"train": {"task": "arithmetic", "num_samples": 8}},
                                 "rewards": [{"name": "math"}]})  # fmt: skip

    check_run(with_window(48), resume=False)
    with pytest.raises(RecipeError, match=r"window_size \(40\) must be a multiple of block_size \(16\)"):
        check_run(with_window(40), resume=False)


def test_sparse_settings_under_dense_attention_are_reported_as_ignored(tmp_path, rlcpm_log):
    check_run(recipe(tmp_path, **{"model.sparse_attention": {"topk": 8}}), resume=False)
    assert "model.sparse_attention is set but model.attention is 'dense'" in rlcpm_log.text


def test_grpo_through_ray_client_fails_before_ray_starts(tmp_path):
    """docs/scaling.md offered cluster.address: ray://head:10001, but Ray Client has no streaming
    generators, which the weight sync uses: the run failed once every actor had loaded."""
    with pytest.raises(TrainingError, match="Ray Client"):
        check_run(recipe(tmp_path, **{"cluster.address": "ray://head:10001"}), False)
    check_run(recipe(tmp_path, **{"cluster.address": "auto"}), False)
