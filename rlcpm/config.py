"""The recipe schema (pydantic v2), YAML loading with `extends:`, and dotted command-line overrides.

A recipe is one typed object. Each fact lives in one place; nothing in YAML is evaluated as code.
Every problem in a recipe is reported at once, with its key path, the bad value and what is allowed.
"""

from __future__ import annotations

import copy
import difflib
import re
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from rlcpm.errors import RecipeError


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, assignments are validated, and a
    number must be finite (a NaN or inf weight, temperature or clip is a typo, never a setting)."""

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        protected_namespaces=(),
        allow_inf_nan=False,
        coerce_numbers_to_str=True,  # `run_dir=2024` or `logging.wandb.name=123` on the command line
    )


# ----------------------------------------------------------------------------------------- model


class SparseAttentionConfig(Section):
    """InfLLM v2 settings (SPECS §2); the defaults are MiniCPM4's `sparse_config`."""

    kernel_size: int = Field(32, gt=0)
    kernel_stride: int = Field(16, gt=0)
    block_size: int = Field(64, gt=0)
    init_blocks: int = Field(1, ge=0)
    window_size: int = Field(2048, ge=0)
    topk: int = Field(64, gt=0)
    dense_len: int = Field(
        8192, ge=-1, description="KV length below which attention is dense; -1: always sparse"
    )
    use_nope: bool = False
    lse_approx: bool = Field(
        True, description="stage-1 LSE approximation over coarse keys (False: exact softmax)"
    )


class TinyModelConfig(Section):
    """Build a tiny random-weight model on the fly (tests, smoke runs): rlcpm.models.tiny."""

    model_type: Literal["llama", "qwen2", "qwen3", "minicpm"] = "llama"
    hidden_size: int = Field(64, gt=0)
    intermediate_size: int = Field(128, gt=0)
    num_hidden_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int = Field(2, gt=0)
    vocab_size: int | None = Field(None, gt=0, description="None: the tokenizer's size")
    max_position_embeddings: int = Field(2048, gt=0)
    tie_word_embeddings: bool = False
    seed: int = 0


class ModelConfig(Section):
    path: str | None = Field(None, description="Hugging Face model directory (config.json + safetensors)")
    tiny: TinyModelConfig | None = Field(
        None, description="build a tiny random model instead of loading `path`"
    )
    tokenizer: str | None = Field(None, description="tokenizer directory; default: the model path")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    attention: Literal["dense", "sparse"] = "dense"
    sparse_attention: SparseAttentionConfig | None = Field(
        None,
        description="overrides the checkpoint's sparse_config key by key (unset keys keep the "
        "checkpoint's values, else MiniCPM4's defaults); used when attention: sparse",
    )
    gradient_checkpointing: bool = False
    chat_template: str | None = Field(None, description="Jinja chat template overriding the tokenizer's")

    def sparse_config_override(self) -> dict | None:
        """The InfLLM v2 keys the recipe sets, for load_model / the engine to merge over the
        checkpoint's `sparse_config` (None: the checkpoint's own)."""
        if self.sparse_attention is None:
            return None
        return self.sparse_attention.model_dump(exclude_unset=True)

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.path is None) == (self.tiny is None):
            raise ValueError(
                "set model.path (a Hugging Face directory) or model.tiny (a tiny random model)"
                + ("" if self.path is None else ", not both")
            )
        return self


# ------------------------------------------------------------------------------------------ data


class SyntheticData(Section):
    """A seeded synthetic task from rlcpm.data.synthetic."""

    task: Literal["arithmetic", "code", "tool_use", "preference"]
    num_samples: int = Field(1000, gt=0)
    seed: int = 0
    options: dict[str, Any] = Field(default_factory=dict, description="task-specific generator options")


class FieldMap(Section):
    """Which column of a dataset row holds which field (missing optional columns are fine)."""

    prompt: str = "prompt"
    messages: str = "messages"
    answer: str = "answer"
    tests: str = "tests"
    tools: str = "tools"
    expected_calls: str = "expected_calls"
    chosen: str = "chosen"
    rejected: str = "rejected"
    response: str = "response"
    id: str = "id"


DataSource = str | SyntheticData


class DataConfig(Section):
    train: DataSource = Field(
        description="a file/directory path, or {task: arithmetic, ...} for synthetic data"
    )
    eval: DataSource | None = None
    format: Literal["auto", "jsonl", "json", "parquet", "csv", "arrow"] = "auto"
    fields: FieldMap = Field(default_factory=FieldMap)
    system_prompt: str | None = None
    apply_chat_template: bool = True
    skip_invalid: bool = Field(False, description="skip and count malformed rows instead of failing")
    shuffle: bool = True
    max_prompt_tokens: int = Field(1024, gt=0)


# --------------------------------------------------------------------------------------- rewards


class RewardSpec(Section):
    """One reward term: a registered `name` or an importable `fn: "pkg.module:function"`."""

    name: str | None = None
    fn: str | None = Field(None, description='"package.module:function"')
    weight: float = 1.0
    timeout_s: float | None = Field(None, gt=0)
    on_error: Literal["zero", "drop"] = Field(
        "zero", description="score 0.0, or drop the sample from the batch"
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments of the reward")

    @model_validator(mode="after")
    def _name_or_fn(self) -> RewardSpec:
        if (self.name is None) == (self.fn is None):
            raise ValueError("give exactly one of `name` (a registered reward) or `fn` ('module:function')")
        if self.fn is not None and ":" not in self.fn:
            raise ValueError(f"fn must look like 'package.module:function', got {self.fn!r}")
        return self

    @property
    def label(self) -> str:
        return self.name or str(self.fn).rsplit(":", 1)[-1]


# ------------------------------------------------------------------------------------- algorithm


class OverlongPenalty(Section):
    """DAPO soft overlong punishment: linear penalty in the last `buffer_tokens` before the limit."""

    buffer_tokens: int = Field(256, gt=0)
    penalty: float = Field(1.0, ge=0)


class RepetitionFilter(Section):
    """Drop responses whose n-gram repetition is too high from the loss (SPECS §1)."""

    ngram: int = Field(8, gt=1)
    max_repeat_fraction: float = Field(0.5, gt=0, le=1)


class GRPOConfig(Section):
    """GRPO / DAPO with chunk-level importance sampling (SPECS §1)."""

    name: Literal["grpo"] = "grpo"
    groups_per_step: int = Field(8, gt=0, description="N: prompt groups per training batch")
    mini_batches: int = Field(
        1, gt=0, description="optimizer updates per RL step (batch split in mini-batches)"
    )
    advantage: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
    std_eps: float = Field(1e-6, gt=0)
    eps_low: float = Field(0.2, ge=0)
    eps_high: float = Field(0.28, ge=0)
    dual_clip: float | None = Field(3.0, gt=1, description="c of dual-clip (A<0 only); null disables")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    ratio_level: Literal["token", "sequence"] = Field("token", description="sequence: GSPO")
    kl_coef: float = Field(0.001, ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_in: Literal["loss", "reward"] = "loss"
    ref_refresh_every: int | None = Field(
        None, gt=0, description="copy the policy into the reference every K steps"
    )
    entropy_coef: float = Field(0.0, ge=0)
    dynamic_sampling: bool = True
    max_oversample: float = Field(
        4.0,
        ge=1,
        description="groups started per step (in flight included) stay within this many x N; a "
        "step that cannot fill N groups trains on fewer, with a warning",
    )
    overlong_filter: bool = True
    overlong_penalty: OverlongPenalty | None = None
    repetition_filter: RepetitionFilter | None = None

    @model_validator(mode="after")
    def _clip_higher(self) -> GRPOConfig:
        if self.eps_high < self.eps_low:
            raise ValueError(f"eps_high ({self.eps_high}) must be >= eps_low ({self.eps_low}) (clip-higher)")
        return self


class DPOConfig(Section):
    name: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cDPO (sigmoid only)")
    pairs_per_step: int = Field(16, gt=0)
    precompute_ref: bool = True
    max_seq_len: int = Field(1024, gt=0)

    @model_validator(mode="after")
    def _cdpo_is_sigmoid(self) -> DPOConfig:
        if self.label_smoothing and self.loss_type != "sigmoid":  # what dpo_loss refuses at the first step
            raise ValueError(
                f"label_smoothing applies to loss_type 'sigmoid' only (cDPO), not {self.loss_type!r}"
            )
        return self


class SFTConfig(Section):
    name: Literal["sft"] = "sft"
    epochs: float = Field(1.0, gt=0)
    samples_per_step: int = Field(32, gt=0)
    max_seq_len: int = Field(1024, gt=0)


def _algorithm_name(value: Any) -> str:
    """The `name` tag of an algorithm section; grpo when left out."""
    if isinstance(value, dict):
        return value.get("name", "grpo")
    return getattr(value, "name", "grpo")


AlgorithmConfig = Annotated[
    Annotated[GRPOConfig, Tag("grpo")] | Annotated[DPOConfig, Tag("dpo")] | Annotated[SFTConfig, Tag("sft")],
    Discriminator(
        _algorithm_name,
        custom_error_type="invalid_algorithm",
        custom_error_message="algorithm.name must be one of 'grpo', 'dpo', 'sft'",
    ),
]


# --------------------------------------------------------------------------------------- rollout


class SpeculativeConfig(Section):
    draft: str = Field(description="draft model directory sharing the target's tokenizer")
    num_draft_tokens: int = Field(4, gt=0)
    frspec_vocab: str | None = Field(None, description="frequency-ranked vocabulary file from `rlcpm freq`")


class RolloutConfig(Section):
    engine: Literal["rlcpm"] = Field(
        "rlcpm", description="the rollout engine (a vLLM backend is not part of this release)"
    )
    workers: int = Field(1, gt=0)
    n_samples: int = Field(8, gt=0, description="G: samples per prompt")
    chunk_tokens: int | None = Field(
        None, gt=0, description="max new tokens per trajectory per step; null: synchronous"
    )
    max_new_tokens: int = Field(1024, gt=0, description="global response length limit")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, description="-1: disabled")
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    max_batch_seqs: int = Field(64, gt=0)
    max_batch_tokens: int | None = Field(
        None,
        gt=0,
        description="tokens per engine forward (decodes + prefill chunks); null: 8192 on a GPU, "
        "2048 on the CPU (prefill 17% faster there than at 8192: activations stay in cache)",
    )
    kv_budget_gb: float | None = Field(
        None, gt=0, description="KV cache memory; null: a safe fraction of free memory"
    )
    max_staleness: int = Field(
        0, ge=0, description="1: one-step overlap; bounds the sampling weights' lag, not a token's age"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    speculative: SpeculativeConfig | None = None

    @model_validator(mode="after")
    def _chunk_le_max(self) -> RolloutConfig:
        if self.max_staleness > 1:
            raise ValueError("max_staleness > 1 is not supported (0: synchronous, 1: one-step overlap)")
        if "" in self.stop:
            raise ValueError("stop holds an empty string (a stop string must have text)")
        if any(token_id < 0 for token_id in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids >= 0, got {self.stop_token_ids}")
        return self


# --------------------------------------------------------------------------------------- learner


class OptimizerConfig(Section):
    name: Literal["adamw"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)


class ScheduleConfig(Section):
    """constant, cosine, or WSD (SPECS §5): warmup, stable, decay of the last `decay_fraction`."""

    name: Literal["constant", "cosine", "wsd"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    decay_fraction: float = Field(0.1, ge=0, le=1)
    decay_form: Literal["exponential", "linear", "cosine"] = "exponential"
    half_life_steps: float | None = Field(
        None, gt=0, description="exponential decay: default decay_steps / 4"
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


class LoraConfig(Section):
    enabled: bool = True
    rank: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(
        0.0, ge=0, lt=1, description="SFT and DPO; GRPO updates run without dropout (ratio = 1 on-policy)"
    )
    targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="names of the decoder's linear layers that get adapters",
    )

    @field_validator("targets")
    @classmethod
    def _decoder_linears_only(cls, targets: list[str]) -> list[str]:
        if "lm_head" in targets:
            raise ValueError("lm_head cannot carry an adapter (the log-prob head reads its weight)")
        return targets


class QATConfig(Section):
    """BitCPM ternary quantization-aware training (SPECS §4)."""

    enabled: bool = True
    group_size: int = Field(32, gt=0)
    rewarmup_steps: int = Field(10, ge=0, description="learning-rate re-warmup after switching QAT on")


class CheckpointConfig(Section):
    every_steps: int = Field(50, gt=0)
    keep_last: int = Field(2, gt=0)
    save_final: bool = True


class LearnerConfig(Section):
    lr: float = Field(1e-6, gt=0)
    total_steps: int = Field(100, gt=0, description="RL / training steps of the run")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    max_grad_norm: float | None = Field(1.0, gt=0)
    micro_batch_tokens: int = Field(8192, gt=0, description="token budget of one packed micro-batch")
    share_prompts: bool = Field(
        True,
        description="pack the responses to one prompt (a GRPO group, a DPO pair) with one copy of it "
        "(same log-probs and gradients, fewer tokens); needs an attention backend that supports it "
        "(dense, reference), else it is off",
    )
    logprob_chunk_tokens: int = Field(
        1024, gt=0, description="tokens per chunk of the memory-lean log-softmax"
    )
    precision: Literal["auto", "float32", "bf16-mixed"] = "auto"
    cpu_gemm: Literal["onednn", "default"] = Field(
        "onednn",
        description="float32 linear layers of a CPU learner: oneDNN (rlcpm.kernels.cpu_gemm; 2-3x "
        "faster than PyTorch's default MKL GEMM on AMD CPUs) or PyTorch's default",
    )
    data_parallel: int = Field(1, gt=0, description="learner ranks (torch.distributed, FSDP2 when > 1)")
    lora: LoraConfig | None = None
    qat: QATConfig | None = None
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @model_validator(mode="after")
    def _lora_or_qat(self) -> LearnerConfig:
        if self.lora is not None and self.lora.enabled and self.qat is not None and self.qat.enabled:
            raise ValueError("lora and qat cannot be combined; unset one of them")
        return self


# --------------------------------------------------------------------------------------- logging


class WandbConfig(Section):
    project: str = "rlcpm"
    entity: str | None = None
    name: str | None = None
    mode: Literal["online", "offline", "disabled"] = "offline"
    tags: list[str] = Field(default_factory=list)


class LoggingConfig(Section):
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    jsonl: bool = True
    samples_every: int = Field(10, ge=0, description="log a samples table every N steps; 0: never")
    num_samples_logged: int = Field(8, ge=0)
    progress: bool = True
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class EvalConfig(Section):
    every_steps: int = Field(0, ge=0, description="0: only before and after training")
    num_prompts: int = Field(200, gt=0)
    temperature: float | None = Field(None, ge=0, description="null: the rollout temperature; 0: greedy")
    greedy: bool = True


class ClusterConfig(Section):
    address: str | None = Field(
        None, description='null: start a local Ray instance; "auto" or "host:port" (not ray:// for GRPO)'
    )
    num_cpus: int | None = Field(None, gt=0, description="local Ray only")
    num_gpus: int | None = Field(None, ge=0, description="local Ray only")
    gpus_per_rollout_worker: float = Field(0.0, ge=0)
    gpus_per_learner: float = Field(0.0, ge=0)
    reward_workers: int = Field(2, gt=0)
    learner_threads: int | None = Field(
        None,
        gt=0,
        description="torch threads of each learner rank (null: OMP_NUM_THREADS, 1 under rlcpm's own Ray)",
    )
    rollout_threads: int | None = Field(
        None,
        gt=0,
        description="torch threads of each rollout worker (null: OMP_NUM_THREADS, 1 under rlcpm's own Ray)",
    )
    retain_cpu_memory: bool = Field(
        True,
        description="CPU learner ranks keep freed memory for reuse instead of returning it to the OS "
        "(rlcpm.cpu_memory): no page faults on every step's activations; resident size stays at its peak",
    )


# ---------------------------------------------------------------------------------------- recipe


class Recipe(Section):
    """A whole run: what to train, on what, how, and where to write it."""

    seed: int = 0
    run_dir: str | None = Field(None, description="default: runs/<recipe file stem>")
    model: ModelConfig
    data: DataConfig
    rewards: list[RewardSpec] = Field(default_factory=list)
    algorithm: AlgorithmConfig = Field(default_factory=GRPOConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _cross_section(self) -> Recipe:
        if isinstance(self.algorithm, GRPOConfig):
            if not self.rewards:
                raise ValueError("algorithm grpo needs at least one entry under `rewards`")
            if self.rollout.n_samples < 2:
                raise ValueError("grpo needs rollout.n_samples >= 2 (advantages are relative to the group)")
            penalty = self.algorithm.overlong_penalty
            if penalty is not None and penalty.buffer_tokens > self.rollout.max_new_tokens:
                raise ValueError(
                    f"algorithm.overlong_penalty.buffer_tokens ({penalty.buffer_tokens}) must be <= "
                    f"rollout.max_new_tokens ({self.rollout.max_new_tokens}): the penalty ramps over the "
                    "last buffer_tokens before the limit"
                )
        return self

    def to_yaml(self) -> str:
        """The resolved recipe, which loads back to the same run: model.sparse_attention keeps only
        the keys set (the others are the checkpoint's, not the defaults shown by the schema), and an
        unset logging.wandb.mode stays unset ($WANDB_MODE decides, rlcpm.monitor.wandb_mode)."""
        resolved = self.model_dump(mode="json")
        resolved["model"]["sparse_attention"] = self.model.sparse_config_override()
        if "mode" not in self.logging.wandb.model_fields_set:
            del resolved["logging"]["wandb"]["mode"]
        return yaml.dump(resolved, Dumper=_RecipeDumper, sort_keys=False)


# ---------------------------------------------------------------------------------------- loading


def load_recipe(
    path: str | Path | None = None, overrides: Sequence[str] | str | None = None, *, data: dict | None = None
) -> Recipe:
    """Load a recipe YAML (following `extends:`), apply dotted overrides, validate.

    Precedence, lowest first: the files named by `extends` (recursively), the file itself,
    then each override in order. Raises RecipeError listing every problem at once.
    """
    if isinstance(path, dict):
        raise RecipeError(["path is a recipe file, got a dict: pass it as load_recipe(data={...})"])
    if data is not None and not isinstance(data, dict):
        raise RecipeError([f"data must be a dict of recipe sections, got {type(data).__name__}"])
    source = str(path) if path is not None else "<dict>"
    raw: dict = _load_with_extends(Path(path), seen=()) if path is not None else {}
    if data:
        raw = deep_merge(raw, copy.deepcopy(data))  # overrides below must not edit the caller's dicts
    if isinstance(overrides, str):  # one override, not a sequence of one-character overrides
        overrides = [overrides]
    problems: list[str] = []
    for item in overrides or []:
        try:
            key, value = parse_override(item)
            set_dotted(raw, key, value)
        except RecipeError as err:
            problems.extend(err.problems)
    if raw.get("run_dir") is None and path is not None:
        raw["run_dir"] = str(Path("runs") / Path(path).stem)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        problems.extend(format_validation_errors(err))
        recipe = None
    if problems:
        raise RecipeError(problems, source=source)
    assert recipe is not None
    return recipe


def _load_with_extends(path: Path, seen: tuple[Path, ...]) -> dict:
    path = path.expanduser()
    if not path.is_file():
        raise RecipeError([f"recipe file not found: {path}"], source=str(path))
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise RecipeError([f"`extends` forms a cycle: {chain}"], source=str(path))
    try:
        loaded = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except _DuplicateKeyError as err:
        raise RecipeError([str(err)], source=str(path)) from err
    except yaml.YAMLError as err:
        raise RecipeError([f"not valid YAML: {err}"], source=str(path)) from err
    if not isinstance(loaded, dict):
        raise RecipeError([f"top level must be a mapping, got {type(loaded).__name__}"], source=str(path))
    parents = loaded.pop("extends", None)
    if parents is None:
        return loaded
    parents = [parents] if isinstance(parents, str) else parents
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise RecipeError(
            [f"`extends` must be a file name or a list of file names, got {parents!r}"], source=str(path)
        )
    merged: dict = {}
    for parent in parents:
        merged = deep_merge(merged, _load_with_extends(path.parent / parent, (*seen, resolved)))
    return deep_merge(merged, loaded)


class _DuplicateKeyError(Exception):
    """A key written twice in one YAML mapping (raised by `_UniqueKeyLoader`, reported as a RecipeError)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key written twice in one mapping is an error (YAML loaders keep
    the last one, so a second `learner:` block would silently drop the first one's settings)."""

    def construct_mapping(self, node, deep=False):
        first_line: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, str | int | float | bool) and key in first_line:
                raise _DuplicateKeyError(f"duplicate key {key!r} at line {line} (first at line {first_line[key]})")
            first_line.setdefault(key, line)
        return super().construct_mapping(node, deep=deep)


class _RecipeDumper(yaml.SafeDumper):
    """safe_dump, quoting the strings that `_UniqueKeyLoader` reads as numbers (Recipe.to_yaml)."""


# YAML 1.1 reads `1e-5` and `1.5e3` (no dot, or no exponent sign) as strings; recipes mean the number,
# in untyped mappings too (a reward's kwargs, a synthetic task's options)
for _yaml_class in (_UniqueKeyLoader, _RecipeDumper):
    _yaml_class.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"),
        list("+-0123456789."),
    )


def deep_merge(base: dict, update: dict) -> dict:
    """Mappings merge key by key (recursively); any other value in `update` replaces the base's."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(item: str) -> tuple[str, Any]:
    """`learner.lr=1e-5` -> ("learner.lr", 1e-05). Values are parsed as YAML scalars / flow lists."""
    if "=" not in item:
        raise RecipeError([f"override {item!r} must look like key.path=value"])
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError([f"override {item!r}: bad key path {key!r}"])
    try:
        value = _yaml_value(text) if text.strip() else ""
    except _DuplicateKeyError as err:
        raise RecipeError([f"override {item!r}: {err}"]) from err
    except yaml.YAMLError:
        value = text
    return key, value


def _yaml_value(text: str) -> Any:
    """A command-line value read as YAML, except that `#` is text there, not a comment
    (`data.system_prompt=Answer #1` would be 'Answer', `...=#` null)."""
    node = yaml.compose(text, Loader=_UniqueKeyLoader)
    if node is None or node.end_mark.index < len(text.rstrip()):  # a comment was skipped
        return text.strip()
    return yaml.load(text, Loader=_UniqueKeyLoader)


def set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise RecipeError([f"override {key}: {'.'.join(parts[: i + 1])} is {child!r}, not a section"])
        node = child
    node[parts[-1]] = value


# -------------------------------------------------------------------------------- error messages


def format_validation_errors(err: ValidationError, root: type[BaseModel] | None = None) -> list[str]:
    """One line per problem, with its key path; `root`: the model validated (default: Recipe)."""
    messages = []
    for e in err.errors():
        loc = tuple(e["loc"])
        if loc and loc[-1] == "str" and isinstance(e.get("input"), dict):
            continue  # a mapping where a path or a mapping may go: its own errors say what is wrong
        path = _display_path(loc)
        if e["type"] == "invalid_algorithm" and isinstance(e.get("input"), dict):
            messages.append(f"{path}: {e['msg']} (got {e['input'].get('name')!r})")
            continue
        if e["type"] == "extra_forbidden":
            allowed = _fields_at(loc[:-1], root or Recipe)
            hint = ""
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
            if close:
                hint = f"; did you mean {_display_path((*loc[:-1], close[0]))!r}?"
            elif allowed:
                hint = f"; allowed keys here: {', '.join(sorted(allowed))}"
            messages.append(f"{path}: unknown key{hint}")
            continue
        msg = e["msg"]
        if e["type"] == "missing" and loc and isinstance(loc[-1], int):  # a short tuple, e.g. betas
            parent = _display_path(loc[:-1])
            messages.append(
                f"{parent}: too few items, item [{loc[-1]}] is missing (got {_short(e['input'])})"
            )
            continue
        if e["type"] == "missing":
            messages.append(f"{path}: required key is missing")
            continue
        if "input" in e and e["type"] not in ("value_error",):
            messages.append(f"{path}: {msg} (got {_short(e['input'])})")
        else:
            messages.append(f"{path or '(recipe)'}: {msg.removeprefix('Value error, ')}")
    return messages


_ALGORITHMS = {"grpo": GRPOConfig, "dpo": DPOConfig, "sft": SFTConfig}
_TAGS = set(_ALGORITHMS)


def _display_path(loc: tuple) -> str:
    """Hide pydantic's union-branch markers (discriminator tags, `str`, `SyntheticData`)."""
    parts = []
    for i, part in enumerate(loc):
        if isinstance(part, int):
            parts.append(f"[{part}]")
            continue
        if i > 0 and loc[i - 1] == "algorithm" and part in _TAGS:
            continue
        if part in _UNION_BRANCH_NAMES:
            continue
        parts.append(("." if parts else "") + str(part))
    return "".join(parts)


_UNION_BRANCH_NAMES = {"str", "SyntheticData", "function-after[_name_or_fn(), RewardSpec]"}


def _fields_at(loc: tuple, root: type[BaseModel]) -> list[str]:
    """Names allowed at a location of the schema (for did-you-mean)."""
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        if isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields:
            model = _section_type(model.model_fields[part].annotation, loc)
        elif part in _TAGS:
            model = _ALGORITHMS[part]
        elif part == "SyntheticData":
            model = SyntheticData
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _section_type(annotation: Any, loc: tuple) -> Any:
    """The BaseModel class inside Optional[...] / list[...] / Annotated[Union...] (None if ambiguous)."""
    args = typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    models = []
    for arg in args:
        found = _section_type(arg, loc)
        if found is not None:
            models.append(found)
    return models[0] if len(models) == 1 else None


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
