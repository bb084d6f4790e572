"""The GRPO loop end to end on real Ray actors with a tiny random model (issue 7 invariants)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from rlcpm.config import load_recipe
from rlcpm.models import load_model
from rlcpm.models.tiny import build_tiny_model_dir
from rlcpm.rollout import sampling_logprobs
from rlcpm.trainer import train
from rlcpm.trainer.evaluation import eval_sampling_params
from rlcpm.trainer.rl_loop import GRPOTrainer

HERE = Path(__file__).parent
# ~1 token in 6 ends a response: lengths spread from 1 to max_new_tokens, so chunking carries over.
STOP_IDS = list(range(3, 400, 6))
PERF_PREFIXES = ("perf/", "sys/", "time")  # measured, not computed: they differ between runs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_model_dir(path, "llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, seed=3)
    return path


def make_recipe(model_dir, run_dir, **over):
    base = {
        "seed": 1,
        "run_dir": str(run_dir),
        "model": {"path": str(model_dir), "dtype": "float32", "device": "cpu"},
        "data": {
            "train": {"task": "arithmetic", "num_samples": 64, "seed": 0},
            "eval": {"task": "arithmetic", "num_samples": 4, "seed": 1, "options": {"partition": "heldout"}},
            "apply_chat_template": False,
        },
        "rewards": [{"fn": "rl_rewards:first_token_even"}],
        "algorithm": {"name": "grpo", "groups_per_step": 2, "kl_coef": 0.0},
        "rollout": {"n_samples": 4, "max_new_tokens": 12, "stop_token_ids": STOP_IDS},
        "learner": {"lr": 5e-3, "total_steps": 2, "checkpoint": {"every_steps": 100}},
        "logging": {"wandb": {"mode": "disabled"}, "progress": False, "samples_every": 0},
        "eval": {"num_prompts": 4, "greedy": False},
        "cluster": {"reward_workers": 1},
    }
    overrides = [f"{k}={json.dumps(v)}" for k, v in over.items()]
    return load_recipe(data=base, overrides=overrides)


@pytest.fixture(autouse=True)
def _importable_rewards(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def comparable(history):
    return [{k: v for k, v in row.items() if not k.startswith(PERF_PREFIXES)} for row in history]


def test_chunk_at_max_length_equals_synchronous(ray_session, model_dir, tmp_path):
    sync = train(make_recipe(model_dir, tmp_path / "sync"))
    chunked = train(make_recipe(model_dir, tmp_path / "chunk", **{"rollout.chunk_tokens": 12}))
    assert comparable(sync.history) == comparable(chunked.history)
    assert [r["train/loss"] for r in sync.history if "train/loss" in r]  # it trained


def test_chunks_span_versions_with_their_own_behaviour_logprobs(ray_session, model_dir, tmp_path):
    recipe = make_recipe(model_dir, tmp_path / "run", **{"rollout.chunk_tokens": 2, "learner.total_steps": 3})
    trainer = GRPOTrainer(recipe)
    snapshots = {0: {k: v.clone() for k, v in trainer.learner.named_weights()}}
    trained = []
    try:
        for step in range(1, 4):
            trainer.step = step
            trainer.train_step()
            trained.extend(trainer.last_groups)
            snapshots[trainer.learner.policy_version] = {
                k: v.clone() for k, v in trainer.learner.named_weights()
            }
    finally:
        trainer.close()
    multi = [t for g in trained for t in g.trajectories if t.num_versions > 1]
    assert multi, "with chunk_tokens=2 some trajectory must span several policy versions"
    model = load_model(model_dir, dtype=torch.float32)
    for traj in multi[:4]:
        ids = torch.tensor(traj.prompt_token_ids + traj.response_token_ids)
        for version in sorted(set(traj.versions)):
            missing, unexpected = model.load_state_dict(snapshots[version], strict=False)
            assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
            with torch.no_grad():
                logits = model(ids[None])[0, len(traj.prompt_token_ids) - 1 : -1]
            expected = sampling_logprobs(
                logits, ids[len(traj.prompt_token_ids) :], recipe.rollout.temperature
            )
            where = [i for i, v in enumerate(traj.versions) if v == version]
            got = torch.tensor([traj.behaviour_logprobs[i] for i in where])
            assert torch.allclose(got, expected[where], atol=1e-5), (
                traj.traj_id,
                version,
                traj.versions,
                got,
                expected,
            )


def test_dynamic_sampling_never_trains_zero_variance_groups(ray_session, model_dir, tmp_path):
    recipe = make_recipe(
        model_dir,
        tmp_path / "run",
        **{
            "rollout.chunk_tokens": 4,
            "algorithm.groups_per_step": 4,
            "rewards": [{"fn": "rl_rewards:first_token_multiple_of_4"}],
        },
    )
    trainer = GRPOTrainer(recipe)
    filtered = 0
    try:
        for step in (1, 2):
            trainer.step = step
            metrics = trainer.train_step()
            filtered += metrics["rollout/groups_filtered"]
            for group in trainer.last_groups:
                correct = sum(r > 0.5 for r in group.rewards)
                assert 0 < correct < len(group.rewards), group.rewards
    finally:
        trainer.close()
    assert filtered > 0  # zero-variance groups did come up, and were kept out of training


def test_over_sampling_stays_within_its_bound_and_a_short_batch_warns(ray_session, model_dir, tmp_path, rlcpm_log):
    """max_oversample 1.5 x 4 groups: at most 6 groups are started per (synchronous) step, and a
    step that fills fewer than 4 says so (it trained on a smaller batch silently, and a second
    round could start another 6)."""
    recipe = make_recipe(
        model_dir,
        tmp_path / "run",
        **{"algorithm.groups_per_step": 4, "algorithm.max_oversample": 1.5,
           "rewards": [{"fn": "rl_rewards:first_token_multiple_of_8"}]},  # fmt: skip
    )
    trainer = GRPOTrainer(recipe)
    short = 0
    try:
        for step in (1, 2, 3):
            trainer.step = step
            metrics = trainer.train_step()
            assert metrics["rollout/groups_finished"] <= 6
            if 0 < len(trainer.last_groups) < 4:
                short += 1
                assert f"step {step}: only {len(trainer.last_groups)} of 4 groups passed" in rlcpm_log.text
    finally:
        trainer.close()
    assert short > 0  # seeded: with ~41% of groups passing, some step falls short


def test_resume_mid_run_matches_uninterrupted(ray_session, model_dir, tmp_path):
    over = {
        "rollout.chunk_tokens": 3,
        "learner.total_steps": 4,
        "learner.checkpoint": {"every_steps": 2, "keep_last": 2},
    }
    full = train(make_recipe(model_dir, tmp_path / "full", **over))
    # An interrupted copy: the run as it was after step 2 (checkpoint with trajectories in flight).
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut, ignore=shutil.ignore_patterns("step_00000004", "final"))
    state = torch.load(cut / "checkpoints/step_00000002/trainer_state.pt", weights_only=False)
    assert state["extra"]["loop"]["chunks"]["in_flight"], "the checkpoint should hold partial trajectories"
    resumed = train(make_recipe(model_dir, cut, **over), resume=True)
    assert comparable(resumed.history) == comparable([r for r in full.history if r["step"] > 2])
    rows = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert comparable(rows) == comparable(full.history)


def test_killed_rollout_worker_loses_no_trajectory(ray_session, model_dir, tmp_path):
    def batch_tokens(kill: bool):
        trainer = GRPOTrainer(make_recipe(model_dir, tmp_path / f"kill{kill}", **{"rollout.chunk_tokens": 3}))
        calls = {"n": 0}
        generate = trainer.rollout.generate

        def generate_killing_on_round_2(requests, group_of):
            calls["n"] += 1
            if kill and calls["n"] == 2:
                trainer.rollout.kill_worker(0)
            return generate(requests, group_of)

        trainer.rollout.generate = generate_killing_on_round_2
        try:
            trainer.step = 1
            trainer.train_step()
            restarts = trainer.rollout.num_restarts
            tokens = [(t.traj_id, t.response_token_ids) for g in trainer.last_groups for t in g.trajectories]
        finally:
            trainer.close()
        return tokens, restarts, calls["n"]

    clean, _, num_rounds = batch_tokens(kill=False)
    assert num_rounds >= 2
    killed, restarts, _ = batch_tokens(kill=True)
    assert restarts == 1
    assert killed == clean


def test_a_worker_that_dies_during_the_update_is_replaced_at_weight_sync(ray_session, model_dir, tmp_path):
    """The update is the longest phase of a step: a worker dying then used to abort the run
    (ActorDiedError from the weight sync)."""
    import ray

    trainer = GRPOTrainer(make_recipe(model_dir, tmp_path / "run", **{"rollout.workers": 2}))
    sync = trainer.rollout.sync_weights

    def sync_after_a_death(named_tensors, version):
        trainer.rollout.kill_worker(1)
        return sync(named_tensors, version)

    trainer.rollout.sync_weights = sync_after_a_death
    try:
        trainer.step = 1
        metrics = trainer.train_step()
        assert "train/loss" in metrics and trainer.rollout.num_restarts == 1
        versions = ray.get([w.health.remote() for w in trainer.rollout.workers])
        assert [v["weight_version"] for v in versions] == [trainer.rollout.version] * 2 == [1, 1]
    finally:
        trainer.close()


def test_sync_time_covers_the_learner_gathering_its_weights(ray_session, model_dir, tmp_path):
    """perf/sync_time_s is the whole learner -> workers sync: the learner's buckets were gathered
    and cast before the pool's timer started, so only the transfer and loads were counted."""
    import time

    trainer = GRPOTrainer(make_recipe(model_dir, tmp_path / "run", **{"data.eval": None}))
    weight_buckets = trainer.learner.weight_buckets

    def slow_buckets(*args, **kwargs):
        time.sleep(1.0)  # a slow gather on the learner
        yield from weight_buckets(*args, **kwargs)

    trainer.learner.weight_buckets = slow_buckets
    try:
        trainer.step = 1
        metrics = trainer.train_step()
    finally:
        trainer.close()
    assert metrics["perf/sync_time_s"] >= 1.0


def test_weights_stream_bucket_by_bucket_and_workers_wait_for_the_last(ray_session, model_dir, tmp_path):
    """The driver flattened every bucket into one list (a full copy of the model) before putting
    it; now it holds one bucket at a time, every worker loading it before the next is fetched.
    Meanwhile the workers refuse to generate; a worker killed mid-stream is replaced and given
    the buckets sent so far."""
    import weakref

    import ray

    from rlcpm.errors import EngineError
    from rlcpm.trainer.chunk_scheduler import ChunkRequest
    from rlcpm.trainer.rollout_pool import RolloutPool

    pool = RolloutPool(make_recipe(model_dir, tmp_path / "run", **{"rollout.workers": 2}), model_dir)
    named = [(n, p.detach() * 1.1) for n, p in load_model(model_dir, dtype=torch.float32).named_parameters()]
    sent, still_held, refused = [], [], []

    def stream():  # one tensor per bucket
        for i, (name, tensor) in enumerate(named):
            still_held.append(sum(ref() is not None for ref in sent))
            if i == 1:
                for worker in pool.workers:
                    with pytest.raises(ray.exceptions.RayTaskError) as info:
                        ray.get(worker.health.remote())
                    refused.append(isinstance(info.value.as_instanceof_cause(), EngineError))
            if i == 2:
                pool.kill_worker(1)
            copy = tensor.clone()
            sent.append(weakref.ref(copy))
            yield [(name, copy)]
            del copy

    try:
        stats = pool.sync_weights(stream(), version=1)
        assert stats.version == 1 and len(sent) == len(named) > 3
        assert still_held == [0] * len(named)  # no earlier bucket alive when the next is fetched
        assert refused == [True, True]
        assert pool.num_restarts == 1
        assert [h["weight_version"] for h in ray.get([w.health.remote() for w in pool.workers])] == [1, 1]
        request = ChunkRequest("t0", [5, 17, 301, 42], [], 3, 8, None)
        outs = [ray.get(w.generate.remote(*pool._call_args([request]))) for w in pool.workers]
        assert outs[0][0].token_ids == outs[1][0].token_ids  # the replacement got every bucket
    finally:
        pool.close()


def test_replacement_workers_that_die_starting_up_count_as_restarts(ray_session, model_dir, tmp_path):
    """A replacement worker dying in start-up (its health call) let the raw RayActorError out
    of the retry loop instead of the EngineError that names the restarts."""
    from rlcpm.errors import EngineError
    from rlcpm.trainer.chunk_scheduler import ChunkRequest
    from rlcpm.trainer.rollout_pool import MAX_RETRIES, RolloutPool

    pool = RolloutPool(make_recipe(model_dir, tmp_path / "run"), model_dir)
    try:
        pool.kill_worker(0)
        pool.model_dir = str(tmp_path / "missing")  # every replacement fails to load its model
        request = ChunkRequest("t0", [5, 17, 301, 42], [], 3, 8, None)
        with pytest.raises(EngineError, match=f"kept failing after {MAX_RETRIES} restarts"):
            pool.generate([request], {"t0": "g"})
        assert pool.num_restarts == 0
    finally:
        pool.close()


def test_every_step_logs_driver_and_rollout_worker_system_metrics(ray_session, model_dir, tmp_path):
    """DESIGN.md names the sys/* namespace; nothing was logged in it."""
    recipe = make_recipe(model_dir, tmp_path / "run", **{"rollout.workers": 2, "rollout.chunk_tokens": 3,
                                                         "data.eval": None})  # fmt: skip
    trainer = GRPOTrainer(recipe)
    try:
        trainer.step = 1
        metrics = trainer.train_step()
        again = trainer.rollout.system_metrics()
    finally:
        trainer.close()
    assert 0.01 < metrics["sys/driver_rss_gb"] < 100
    for i in range(2):
        assert 0.01 < metrics[f"sys/rollout{i}_rss_gb"] < 100
        assert 0.0 <= metrics[f"sys/rollout{i}_kv_used_fraction"] <= 1.0
    # chunked: carried-over trajectories keep their paused KV after the step's rollout
    assert max(metrics[f"sys/rollout{i}_kv_used_fraction"] for i in range(2)) > 0
    assert metrics["sys/rollout_preemptions"] >= 0 and again["sys/rollout_preemptions"] == 0


def test_sparse_attention_recipe_trains_end_to_end(ray_session, model_dir, tmp_path):
    """model.attention: sparse reaches both the learner and the rollout workers (InfLLM v2)."""
    sparse = {
        "kernel_size": 4,
        "kernel_stride": 2,
        "block_size": 4,
        "window_size": 8,
        "topk": 2,
        "dense_len": 0,
    }
    recipe = make_recipe(
        model_dir,
        tmp_path / "run",
        **{"model.attention": "sparse", "model.sparse_attention": sparse, "learner.total_steps": 1,
           "rollout.max_new_tokens": 24, "rollout.stop_token_ids": []},
    )  # fmt: skip
    trainer = GRPOTrainer(recipe)
    try:
        trainer.step = 1
        metrics = trainer.train_step()
        groups = trainer.last_groups
    finally:
        trainer.close()
    assert metrics["train/num_updates"] == 1
    # The behaviour log-probs came from the engine's sparse attention: the learner's sparse forward
    # at version 0 (ratio == 1 on the first update) agrees, as does a fresh sparse model.
    assert abs(metrics["train/ratio_mean"] - 1.0) < 1e-4
    model = load_model(model_dir, dtype=torch.float32, attention="sparse", sparse_config=sparse)
    dense = load_model(model_dir, dtype=torch.float32)
    traj = max((t for g in groups for t in g.trajectories), key=lambda t: len(t.response_token_ids))
    ids = torch.tensor(traj.prompt_token_ids + traj.response_token_ids)
    start = len(traj.prompt_token_ids) - 1
    with torch.no_grad():
        sparse_lp = sampling_logprobs(model(ids[None])[0, start:-1], ids[start + 1 :], 1.0)
        dense_lp = sampling_logprobs(dense(ids[None])[0, start:-1], ids[start + 1 :], 1.0)
    assert torch.allclose(torch.tensor(traj.behaviour_logprobs), sparse_lp, atol=1e-5)
    assert not torch.allclose(sparse_lp, dense_lp, atol=1e-4)  # sparse really differs from dense here


def test_one_step_overlap_samples_one_version_behind(ray_session, model_dir, tmp_path):
    """rollout.max_staleness: 1 trains batch k while batch k+1 is sampled with the pre-update weights."""
    recipe = make_recipe(
        model_dir, tmp_path / "run", **{"rollout.max_staleness": 1, "learner.total_steps": 4,
                                        "learner.checkpoint": {"every_steps": 2}}  # fmt: skip
    )
    history = [row for row in train(recipe).history if "rollout/staleness_mean" in row]
    # step 2 checkpoints, so it finishes its update: step 3 samples with the current weights
    assert [row["rollout/staleness_mean"] for row in history] == [0.0, 1.0, 0.0, 1.0]
    # each step's row is written once its own update has finished (the next step's rollout ran
    # meanwhile), so every update's train/* metrics are logged, in its own row (an update that
    # overlapped into a checkpoint step lost its metrics before)
    assert [row["step"] for row in history] == [1, 2, 3, 4]
    assert [row["train/policy_version"] for row in history] == [1, 2, 3, 4]
    assert all("train/loss" in row and "perf/learn_time_s" in row for row in history)


def test_an_overlapped_update_logs_its_own_learn_time_not_the_next_rollouts(ray_session, model_dir, tmp_path):
    """With rollout.max_staleness: 1, step 1's update runs beside step 2's rollout: its
    perf/learn_time_s is the update's time (it was the time until the driver asked for the
    result, i.e. at least the whole next rollout)."""
    import time

    recipe = make_recipe(model_dir, tmp_path / "run", **{"rollout.max_staleness": 1, "data.eval": None})
    trainer = GRPOTrainer(recipe)
    generate = trainer.rollout.generate

    def slow_generate(requests, group_of):
        if trainer.step == 2:
            time.sleep(3.0)
        return generate(requests, group_of)

    trainer.rollout.generate = slow_generate
    try:
        trainer.fit()
        rows = {row["step"]: row for row in trainer.monitor.history}
    finally:
        trainer.close()
    assert rows[2]["perf/sampling_time_s"] > 3.0
    assert rows[1]["perf/learner_step_s"] <= rows[1]["perf/learn_time_s"] < 2.0


def test_qat_recipe_samples_from_the_ternary_policy_and_exports_it(ray_session, model_dir, tmp_path):
    """learner.qat in a GRPO recipe: the rollout workers hold W_q from the first step (so the
    behaviour log-probs are the ternary model's: ratio == 1 on the first update, which full
    precision sampling would not give), and the run ends with the packed ternary export."""
    from rlcpm.quant.ternary_linear import TernaryLinear

    over = {
        "learner.qat": {"enabled": True, "group_size": 16},
        "learner.total_steps": 2,
        "learner.checkpoint": {"every_steps": 100, "save_final": True},
        "rollout.chunk_tokens": 4,
    }
    result = train(make_recipe(model_dir, tmp_path / "run", **over))
    first = next(row for row in result.history if "train/ratio_mean" in row)
    assert abs(first["train/ratio_mean"] - 1.0) < 1e-4 and first["train/ratio_max"] < 1.0 + 1e-4
    exported = load_model(result.final_model_dir)
    assert any(isinstance(m, TernaryLinear) for m in exported.modules())
    full = load_model(model_dir)
    assert not any(isinstance(m, TernaryLinear) for m in full.modules())


def test_bfloat16_rollout_workers_get_the_learners_weights_cast_to_bfloat16(ray_session, model_dir, tmp_path):
    """rollout.dtype: bfloat16 beside a float32 learner: weights are cast before they travel
    (half the bytes), and the behaviour log-probs agree with the learner's to bfloat16 rounding."""
    recipe = make_recipe(model_dir, tmp_path / "run", **{"rollout.dtype": "bfloat16"})
    history = train(recipe).history
    num_params = sum(p.numel() for p in load_model(model_dir).parameters())
    synced = [row["perf/sync_bytes"] for row in history if "perf/sync_bytes" in row]
    assert synced and all(num_bytes == 2 * num_params for num_bytes in synced)
    first = next(row for row in history if "train/ratio_mean" in row)
    assert abs(first["train/ratio_mean"] - 1.0) < 0.05
    assert [row["train/policy_version"] for row in history if "train/policy_version" in row][-1] == 2


def test_a_bfloat16_checkpoint_with_dtype_auto_syncs_the_float32_learner_cast_to_bfloat16(ray_session, tmp_path):
    """model.dtype / rollout.dtype auto (the defaults) on a bfloat16 checkpoint: the engines load
    it in bfloat16 and the float32 learner's weights are cast to that before they travel (they
    were sent as float32: WeightSyncError at the first sync, before any step)."""
    model_dir = build_tiny_model_dir(
        tmp_path / "bf16", "llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, seed=3,
        dtype=torch.bfloat16,
    )  # fmt: skip
    recipe = make_recipe(model_dir, tmp_path / "run", **{"model.dtype": "auto", "learner.total_steps": 1})
    history = train(recipe).history
    num_params = sum(p.numel() for p in load_model(model_dir).parameters())
    synced = [row["perf/sync_bytes"] for row in history if "perf/sync_bytes" in row]
    assert synced and all(num_bytes == 2 * num_params for num_bytes in synced)
    assert [row["train/policy_version"] for row in history if "train/policy_version" in row] == [1]


def test_steps_without_signal_skip_the_update_but_not_the_schedule(ray_session, model_dir, tmp_path):
    """Every group fails dynamic sampling: nothing trains, and the LR schedule still moves with the
    run's steps (it used to stand still, so a run with skips never reached its decayed rate)."""
    schedule = {"name": "wsd", "warmup_steps": 0, "decay_fraction": 0.5, "decay_form": "linear"}
    recipe = make_recipe(
        model_dir, tmp_path / "run", **{"rewards": [{"fn": "rl_rewards:always_zero"}], "learner.total_steps": 2,
                                        "learner.schedule": schedule, "algorithm.max_oversample": 1, "data.eval": None}
    )  # fmt: skip
    rows = [r for r in train(recipe).history if "train/skipped" in r]
    assert len(rows) == 2 and "train/loss" not in rows[0]
    assert [r["train/lr"] for r in rows] == [5e-3, 0.0]  # the rates steps 1 and 2 would have run at


def test_resume_without_a_checkpoint_starts_fresh_logs(ray_session, model_dir, tmp_path):
    """--resume in a run_dir that never checkpointed starts over: the earlier attempt's rows
    (its step-0 evaluation included) are not kept next to the new run's."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 0, "eval/accuracy": 0.5}\n{"step": 1, "train/loss": 1.0}\n')
    (run_dir / "samples.jsonl").write_text('{"step": 0, "response": "old"}\n')
    trainer = GRPOTrainer(make_recipe(model_dir, run_dir), resume=True)
    trainer.close()
    assert trainer.step == 0
    assert (run_dir / "metrics.jsonl").read_text() == ""
    assert not (run_dir / "samples.jsonl").exists()


def test_final_export_keeps_the_source_generation_config(ray_session, model_dir, tmp_path):
    """run_dir/final is what one serves: its generation_config.json is the source model's (both
    stop ids of the tiny model: <|im_end|> and <|endoftext|>), not one rebuilt from config.json's
    single eos_token_id, as the SFT / DPO final export already keeps it. It also carries the
    recipe's model.chat_template, the one the run rendered its prompts with (it held the source's)."""
    from rlcpm.models import load_tokenizer

    source = json.loads((model_dir / "generation_config.json").read_text())
    assert isinstance(source["eos_token_id"], list) and len(source["eos_token_id"]) == 2
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    overrides = {"learner.total_steps": 1, "model.chat_template": template}
    result = train(make_recipe(model_dir, tmp_path / "run", **overrides))
    final = json.loads((result.final_model_dir / "generation_config.json").read_text())
    assert final["eos_token_id"] == source["eos_token_id"]
    assert load_tokenizer(result.final_model_dir).chat_template == template


def test_eval_every_steps_evaluates_the_last_step_once(ray_session, model_dir, tmp_path):
    """eval.every_steps dividing total_steps: the last step was evaluated twice on the same
    weights (in its step and again as the final evaluation), logging two eval rows for it."""
    recipe = make_recipe(model_dir, tmp_path / "run", **{"eval.every_steps": 1, "rollout.n_samples": 2})
    history = train(recipe).history
    assert [row["step"] for row in history if "eval/accuracy" in row] == [0, 1, 2]


def test_rollout_workers_load_the_tokenizer_of_model_tokenizer(ray_session, model_dir, tmp_path):
    """model.tokenizer names the tokenizer of a model directory that has none: the rollout
    workers loaded it from model.path anyway, and died starting up."""
    from rlcpm.trainer.rollout_pool import RolloutPool

    weights, tokenizer = tmp_path / "weights", tmp_path / "tokenizer"
    shutil.copytree(model_dir, weights)
    tokenizer.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.move(weights / name, tokenizer / name)
    recipe = make_recipe(weights, tmp_path / "run", **{"model.tokenizer": str(tokenizer), "rollout.stop": ["\n"]})
    pool = RolloutPool(recipe, weights)
    try:
        assert pool.generate_plain([[5, 17, 301]], eval_sampling_params(recipe, 0.0, 1))[0].token_ids
    finally:
        pool.close()


def test_a_run_that_fails_starting_up_releases_its_actors(ray_session, model_dir, tmp_path, monkeypatch):
    """A start-up error after the actors exist (wandb online without an API key, a checkpoint of
    another n_samples) left the learner, rollout and reward actors alive, holding their CPUs: in a
    notebook every retry of `train` added another set, until one waited for CPUs forever."""
    import time

    import ray

    from rlcpm.errors import RlcpmError
    from rlcpm.trainer import rl_loop

    def no_wandb(*args, **kwargs):
        raise RlcpmError("wandb (online): No API key configured")

    free_cpus = ray.available_resources().get("CPU", 0)
    monkeypatch.setattr(rl_loop, "Monitor", no_wandb)
    with pytest.raises(RlcpmError, match="API key"):
        train(make_recipe(model_dir, tmp_path / "run"))
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < free_cpus and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) >= free_cpus


def test_speculation_metrics_count_the_steps_rollouts_not_the_evaluations(ray_session, model_dir, tmp_path):
    """rollout/spec_* are over a step's rollout rounds (docs/speculative.md): the evaluation
    before step 1 and after each step drafted too, and its rounds were logged as the next
    step's (a step served from buffered groups reported the evaluation's acceptance alone)."""
    spec = {"rollout.speculative": {"draft": str(model_dir), "num_draft_tokens": 3}}

    def spec_rounds(**overrides):
        recipe = make_recipe(model_dir, tmp_path / str(len(overrides)), **spec, **overrides)
        return [row.get("rollout/spec_rounds") for row in train(recipe).history if "train/loss" in row]

    without_eval = spec_rounds(**{"data.eval": None})
    assert without_eval[0] > 0
    assert spec_rounds(**{"eval.every_steps": 1, "eval.greedy": True}) == without_eval
