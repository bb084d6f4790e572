"""Recipe schema: loading, extends-merge, overrides, and every error path."""

from __future__ import annotations

import textwrap

import pytest

from rlcpm.config import (
    DPOConfig,
    GRPOConfig,
    SyntheticData,
    deep_merge,
    load_recipe,
    parse_override,
)
from rlcpm.errors import RecipeError

MINIMAL = """
model: {tiny: {model_type: llama}}
data: {train: {task: arithmetic}}
rewards: [{name: math}]
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(excinfo) -> list[str]:
    return excinfo.value.problems


def test_minimal_recipe_gets_spec_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, "r.yaml", MINIMAL))
    algo = recipe.algorithm
    assert isinstance(algo, GRPOConfig)
    assert (algo.eps_low, algo.eps_high, algo.dual_clip) == (0.2, 0.28, 3.0)
    assert algo.loss_agg == "token-mean" and algo.kl_estimator == "k3" and algo.kl_coef == 0.001
    assert recipe.rollout.chunk_tokens is None and recipe.rollout.temperature == 1.0
    assert isinstance(recipe.data.train, SyntheticData)
    assert recipe.run_dir == "runs/r"  # default derives from the file name


def test_override_coercion(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL)
    recipe = load_recipe(
        path,
        [
            "learner.lr=1e-5",
            "rollout.chunk_tokens=512",
            'rollout.stop=[</s>, "\\n\\n"]',
            "algorithm.dual_clip=null",
            "logging.jsonl=false",
            "model.tiny.hidden_size=32",
            "learner.optimizer.betas=[0.9, 0.95]",
            "logging.wandb.name=123",  # YAML reads a number; a text setting takes it as text
            "run_dir=2024",
        ],
    )
    assert recipe.learner.lr == pytest.approx(1e-5) and isinstance(recipe.learner.lr, float)
    assert recipe.rollout.chunk_tokens == 512
    assert recipe.rollout.stop == ["</s>", "\n\n"]
    assert recipe.algorithm.dual_clip is None
    assert recipe.logging.jsonl is False
    assert recipe.model.tiny.hidden_size == 32
    assert recipe.learner.optimizer.betas == (0.9, 0.95)
    assert recipe.logging.wandb.name == "123" and recipe.run_dir == "2024"


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL + "learner: {lr: 1e-5}\n")
    assert load_recipe(path).learner.lr == pytest.approx(1e-5)


def test_override_precedence_last_wins_over_file_over_base(tmp_path):
    write(tmp_path, "base.yaml", MINIMAL + "learner: {lr: 0.1, total_steps: 7}\nseed: 1\n")
    child = write(tmp_path, "child.yaml", "extends: base.yaml\nlearner: {lr: 0.2}\nseed: 2\n")
    recipe = load_recipe(child, ["seed=3", "seed=4"])
    assert recipe.learner.lr == pytest.approx(0.2)  # the file beats its base
    assert recipe.learner.total_steps == 7  # deep merge keeps the base's sibling keys
    assert recipe.seed == 4  # later overrides beat earlier ones and the file


def test_extends_chain_and_list_of_parents(tmp_path):
    write(tmp_path, "a.yaml", MINIMAL + "rollout: {n_samples: 4, temperature: 0.7}\n")
    write(tmp_path, "b.yaml", "rollout: {n_samples: 16}\n")
    (tmp_path / "sub").mkdir()
    child = write(tmp_path, "sub/c.yaml", "extends: [../a.yaml, ../b.yaml]\nrollout: {top_p: 0.9}\n")
    recipe = load_recipe(child)
    assert recipe.rollout.n_samples == 16  # later parent wins
    assert recipe.rollout.temperature == pytest.approx(0.7)
    assert recipe.rollout.top_p == pytest.approx(0.9)


def test_extends_cycle_is_reported(tmp_path):
    write(tmp_path, "a.yaml", "extends: b.yaml\n")
    write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_lists_are_replaced_not_merged():
    assert deep_merge({"a": [1, 2], "b": {"c": 1}}, {"a": [3], "b": {"d": 2}}) == {
        "a": [3],
        "b": {"c": 1, "d": 2},
    }


def test_algorithm_switch_by_override(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL)
    recipe = load_recipe(path, ["algorithm.name=dpo", "algorithm.beta=0.2"])
    assert isinstance(recipe.algorithm, DPOConfig) and recipe.algorithm.beta == pytest.approx(0.2)


def test_three_mistakes_reported_together(tmp_path):
    path = write(
        tmp_path,
        "bad.yaml",
        """
        model: {tiny: {model_type: llama}}
        data: {train: {task: arithmetic}}
        rewards: [{name: math}]
        learner: {lr: fast}
        rollout: {temperture: 0.7}
        algorithm: {name: grpo, loss_agg: mean}
        """,
    )
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path)
    problems = problems_of(excinfo)
    assert len(problems) == 3, problems
    text = "\n".join(problems)
    assert "learner.lr" in text and "'fast'" in text
    assert "rollout.temperture: unknown key; did you mean 'rollout.temperature'?" in text
    assert "algorithm.loss_agg" in text and "token-mean" in text  # the allowed values are named
    assert str(path) in str(excinfo.value)


def test_unknown_key_without_close_match_lists_allowed(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL + "cluster: {zzz: 1}\n")
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path)
    (problem,) = problems_of(excinfo)
    assert problem.startswith("cluster.zzz: unknown key; allowed keys here:") and "address" in problem


def test_unknown_key_inside_algorithm_and_list_item(tmp_path):
    path = write(
        tmp_path,
        "r.yaml",
        """
        model: {tiny: {model_type: llama}}
        data: {train: {task: arithmetic}}
        rewards: [{name: math, wieght: 2}]
        algorithm: {name: grpo, eps_hihg: 0.3}
        """,
    )
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path)
    text = "\n".join(problems_of(excinfo))
    assert "rewards[0].wieght: unknown key; did you mean 'rewards[0].weight'?" in text
    assert "algorithm.eps_hihg: unknown key; did you mean 'algorithm.eps_high'?" in text


def test_missing_required_sections(tmp_path):
    path = write(tmp_path, "r.yaml", "seed: 1\n")
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path)
    text = "\n".join(problems_of(excinfo))
    assert "model: required key is missing" in text and "data: required key is missing" in text


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("algorithm.eps_high=0.1", "eps_high (0.1) must be >= eps_low"),
        ("rollout.n_samples=1", "n_samples >= 2"),
        ("rewards=[]", "at least one entry under `rewards`"),
        ("algorithm.name=ppo", "algorithm"),
        ("rollout.top_p=1.5", "rollout.top_p"),
        ("model.tiny=null", "set model.path"),
        ("rollout.max_staleness=3", "max_staleness"),
        # passed validation; the engines refused them only once the rollout workers were up
        ("rollout.stop=['</answer>', '']", "stop holds an empty string"),
        ("rollout.stop_token_ids=[2, -1]", "stop_token_ids must be token ids >= 0"),
        ("learner.lora={targets: []}", "learner.lora.targets: List should have at least 1 item"),
        ("learner.lora={targets: [q_proj, lm_head]}", "lm_head cannot carry an adapter"),
        ("rewards=[{name: math, weight: .nan}]", "rewards[0].weight: Input should be a finite number"),
        ("rollout.temperature=inf", "rollout.temperature: Input should be a finite number"),
        # was "betas[1]: required key is missing"
        (
            "learner.optimizer.betas=[0.9]",
            "learner.optimizer.betas: too few items, item [1] is missing (got [0.9])",
        ),
        ("algorithm.eps_high=inf", "algorithm.eps_high: Input should be a finite number"),
        (
            "algorithm={name: dpo, loss_type: ipo, label_smoothing: 0.1}",
            "label_smoothing applies to loss_type 'sigmoid' only (cDPO), not 'ipo'",
        ),
    ],
)
def test_value_errors_name_the_problem(tmp_path, override, fragment):
    path = write(tmp_path, "r.yaml", MINIMAL)
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path, [override])
    assert fragment in str(excinfo.value)


def test_reward_spec_needs_exactly_one_source(tmp_path):
    path = write(
        tmp_path, "r.yaml", MINIMAL.replace("[{name: math}]", "[{name: math, fn: 'a:b'}, {fn: nocolon}]")
    )
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path)
    text = str(excinfo.value)
    assert "rewards[0]" in text and "exactly one" in text
    assert "rewards[1]" in text and "package.module:function" in text


@pytest.mark.parametrize("bad", ["noequals", "=3", "a..b=1"])
def test_malformed_overrides(tmp_path, bad):
    with pytest.raises(RecipeError, match="override"):
        load_recipe(write(tmp_path, "r.yaml", MINIMAL), [bad])


def test_one_override_as_a_string(tmp_path):
    # a bare string was iterated character by character: one error per letter
    recipe = load_recipe(write(tmp_path, "r.yaml", MINIMAL), overrides="learner.lr=3e-5")
    assert recipe.learner.lr == 3e-5
    recipe = load_recipe(write(tmp_path, "r.yaml", MINIMAL), overrides=("learner.lr=2e-5",))
    assert recipe.learner.lr == 2e-5


def test_override_into_scalar_is_an_error(tmp_path):
    with pytest.raises(RecipeError, match="seed is 0, not a section"):
        load_recipe(write(tmp_path, "r.yaml", MINIMAL + "seed: 0\n"), ["seed.x=1"])


def test_parse_override_types():
    assert parse_override("a=1") == ("a", 1)
    assert parse_override("a=1.5e3") == ("a", 1500.0)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=null") == ("a", None)
    assert parse_override("a=hello world") == ("a", "hello world")
    assert parse_override("a=x=y") == ("a", "x=y")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "bad.yaml", "model: [unclosed\n"))
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(write(tmp_path, "list.yaml", "- 1\n- 2\n"))


def test_a_key_written_twice_is_an_error_not_a_silent_override(tmp_path):
    """YAML loaders keep the last of two equal keys: a second `learner:` block would drop the
    first one's settings without a word."""
    text = MINIMAL + "learner:\n  lr: 0.5\nrollout: {n_samples: 4}\nlearner:\n  total_steps: 7\n"
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(write(tmp_path, "dup.yaml", text))
    assert problems_of(excinfo) == ["duplicate key 'learner' at line 8 (first at line 5)"]
    nested = MINIMAL + "learner: {lr: 0.5, schedule: {name: wsd}, lr: 0.1}\n"
    with pytest.raises(RecipeError, match="duplicate key 'lr' at line 5"):
        load_recipe(write(tmp_path, "nested.yaml", nested))
    anchored = MINIMAL.replace("data: {train: {task: arithmetic}}", "data:\n  train: &t {task: arithmetic, seed: 1}\n  eval: {<<: *t, seed: 2}")
    assert load_recipe(write(tmp_path, "anchored.yaml", anchored)).data.eval.seed == 2  # merge keys may be overridden


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path, "r.yaml", MINIMAL), ["rollout.chunk_tokens=64"])
    again = write(tmp_path, "again.yaml", recipe.to_yaml())
    assert load_recipe(again) == recipe


def test_overrides_do_not_edit_the_callers_data_dict():
    tiny = {"model_type": "llama", "hidden_size": 16}
    data = {"model": {"tiny": tiny}, "data": {"train": {"task": "arithmetic"}}, "rewards": [{"name": "math"}]}
    recipe = load_recipe(data=data, overrides=["model.tiny.hidden_size=32"])
    assert recipe.model.tiny.hidden_size == 32 and tiny["hidden_size"] == 16


def test_a_dict_given_as_the_path_or_a_non_dict_data_is_a_recipe_error():
    """load_recipe({...}) crashed with TypeError 'expected str, bytes or os.PathLike object, not dict'."""
    with pytest.raises(RecipeError, match=r"got a dict: pass it as load_recipe\(data=\{\.\.\.\}\)"):
        load_recipe({"model": {"path": "m"}})
    with pytest.raises(RecipeError, match="data must be a dict of recipe sections, got list"):
        load_recipe(data=[{"model": {"path": "m"}}])


def test_a_mapping_data_source_reports_only_its_own_error_and_a_bad_algorithm_only_its_name(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL)
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path, ["data.train={task: arithmetic, num_sample: 5}", "algorithm.name=ppo"])
    assert excinfo.value.problems == [
        "data.train.num_sample: unknown key; did you mean 'data.train.num_samples'?",
        "algorithm: algorithm.name must be one of 'grpo', 'dpo', 'sft' (got 'ppo')",
    ]



def test_overlong_penalty_buffer_must_fit_in_max_new_tokens(tmp_path):
    """The penalty ramps over the last buffer_tokens before rollout.max_new_tokens: a larger buffer
    (the default 256 with a short max_new_tokens) was accepted and failed at the first scored group."""
    path = write(tmp_path, "r.yaml", MINIMAL)
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path, ["algorithm.overlong_penalty={}", "rollout.max_new_tokens=64"])
    assert "buffer_tokens (256) must be <= rollout.max_new_tokens (64)" in str(excinfo.value)
    recipe = load_recipe(path, ["algorithm.overlong_penalty={buffer_tokens: 64}", "rollout.max_new_tokens=64"])
    assert recipe.algorithm.overlong_penalty.buffer_tokens == 64


@pytest.mark.parametrize("text", ["Answer #1 only", "#", "[a, b] # two stops"])
def test_hash_in_an_override_value_is_text_not_a_comment(text):
    """YAML reads ` #...` as a comment: `data.system_prompt=Answer #1 only` became 'Answer', and
    `data.system_prompt=#` became null, without a word."""
    assert parse_override(f"data.system_prompt={text}") == ("data.system_prompt", text)
    assert parse_override("a='x #y'") == ("a", "x #y")  # a quoted value is YAML as before


@pytest.mark.parametrize("parents", ["5", "[a.yaml, null]", "{a.yaml: 1}"])
def test_extends_that_is_not_file_names_is_reported(tmp_path, parents):
    """`extends: 5` or a null in its list crashed with a TypeError; a mapping's keys were read as files."""
    write(tmp_path, "a.yaml", MINIMAL)
    with pytest.raises(RecipeError, match="`extends` must be a file name or a list of file names"):
        load_recipe(write(tmp_path, "c.yaml", f"extends: {parents}\n"))


def test_resolved_recipe_keeps_the_checkpoints_sparse_attention_keys(tmp_path):
    """Keys left out of model.sparse_attention are the checkpoint's: the resolved YAML (a run's
    recipe.yaml, `rlcpm validate`) wrote MiniCPM4's defaults for them, so running it again
    overrode the checkpoint's sparse_config."""
    recipe = load_recipe(write(tmp_path, "r.yaml", MINIMAL), ["model.sparse_attention={topk: 8}"])
    again = load_recipe(write(tmp_path, "again.yaml", recipe.to_yaml()))
    assert again.model.sparse_config_override() == recipe.model.sparse_config_override() == {"topk": 8}
    assert again == recipe


def test_resolved_recipe_leaves_wandb_mode_to_wandb_mode_env_when_unset(tmp_path, monkeypatch):
    """An unset logging.wandb.mode defers to $WANDB_MODE: the resolved YAML wrote `mode: offline`,
    so running a run's recipe.yaml again ignored WANDB_MODE=online."""
    from rlcpm.monitor import wandb_mode

    monkeypatch.setenv("WANDB_MODE", "online")
    recipe = load_recipe(write(tmp_path, "r.yaml", MINIMAL))
    again = load_recipe(write(tmp_path, "again.yaml", recipe.to_yaml()))
    assert wandb_mode(again.logging.wandb) == wandb_mode(recipe.logging.wandb) == "online"
    chosen = load_recipe(write(tmp_path, "r.yaml", MINIMAL), ["logging.wandb.mode=offline"])
    assert wandb_mode(load_recipe(write(tmp_path, "again.yaml", chosen.to_yaml())).logging.wandb) == "offline"


def test_exponent_without_dot_is_a_number_inside_kwargs_and_options(tmp_path):
    """YAML 1.1 reads `1e-6` as a string: the typed fields convert it, but a reward's kwargs and a
    synthetic task's options are untyped, so a user reward got tol='1e-6' (file or override)."""
    text = MINIMAL.replace("{name: math}", "{name: math, kwargs: {tol: 1e-6, n: 2, tag: v1e5}}")
    recipe = load_recipe(
        write(tmp_path, "r.yaml", text), ["data.train={task: arithmetic, options: {p: 5E+2}}"]
    )
    assert recipe.rewards[0].kwargs == {"tol": 1e-6, "n": 2, "tag": "v1e5"}
    assert recipe.data.train.options == {"p": 500.0}
    recipe = load_recipe(
        write(tmp_path, "r.yaml", MINIMAL), ["logging.wandb.name='1e3'", "data.system_prompt='2E-1'"]
    )
    again = load_recipe(write(tmp_path, "again.yaml", recipe.to_yaml()))
    assert (again.logging.wandb.name, again.data.system_prompt) == ("1e3", "2E-1")  # quoted: text
