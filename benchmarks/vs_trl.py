"""GRPO step time: rlcpm vs TRL's GRPOTrainer on the same model, batch, group size and lengths.

Both run on this CPU in float32 (or both in bfloat16 with `--dtype bfloat16`: TRL's `bf16=True`,
rlcpm's `rollout.dtype: bfloat16` and `learner.precision: bf16-mixed`, each over float32
master weights): the same tiny-vocabulary llama with tens of millions of parameters (random weights), the same prompts (synthetic arithmetic), `prompts x G`
completions of up to `max_new_tokens` per step, EOS as the only stop, no KL, one optimizer
update per step. TRL generates with transformers `generate`; rlcpm with its engine on a Ray
rollout worker and a Ray learner, either synchronously (phases one after the other, each with
all threads) or with `rollout.max_staleness: 1` (rlcpm-overlap: step k+1's rollout runs
while step k trains, the rollout worker on one thread and the learner on all of them, its
idle threads waiting passively; the importance ratio uses the recorded behaviour log-probs,
so the update stays correct one version behind).
Each system runs in its own process, `--rounds` times in the order trl, rlcpm, rlcpm-overlap,
then reversed (the VM's speed drifts over minutes; alternating spreads that over every
system); the first `--warmup` steps of each process are left out of the pooled mean.

    python -m benchmarks.vs_trl [--steps 4] [--rounds 2] [--max-new-tokens 256] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine_info, write_result


def build_model(root: Path, args) -> Path:
    from rlcpm.models.tiny import build_tiny_model_dir

    return build_tiny_model_dir(
        root / "model", "llama", hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4, seed=0,
    )  # fmt: skip


def prompts(n: int) -> list[str]:
    from rlcpm.data.synthetic import generate

    return [row["prompt"] for row in generate("arithmetic", n, seed=0)]


def run_trl(model_dir: str, args) -> list[float]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    batch = args.prompts * args.samples
    dataset = Dataset.from_list([{"prompt": p} for p in prompts(batch * (args.steps + 1))])
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)

    def zero_reward(completions, **kwargs):
        return [0.0] * len(completions)

    config = GRPOConfig(
        output_dir=str(Path(args.tmp) / "trl"), use_cpu=True, bf16=args.dtype == "bfloat16", report_to="none",
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, num_generations=args.samples,
        max_completion_length=args.max_new_tokens, max_steps=args.steps, learning_rate=1e-6, beta=0.0,
        temperature=1.0, logging_steps=1, save_strategy="no", seed=0, num_iterations=1,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=model, reward_funcs=[zero_reward], args=config, train_dataset=dataset, processing_class=tokenizer,
        callbacks=[StepTimer()],
    )  # fmt: skip
    trainer.train()
    return times


def run_rlcpm(model_dir: str, args, overlap: bool = False) -> list[float]:
    """overlap: rollout.max_staleness 1 (step k+1's rollout runs while step k trains), the
    rollout worker on one thread beside the learner on all of them, instead of taking turns."""
    import ray

    from rlcpm.config import load_recipe
    from rlcpm.trainer import train

    env = {"OMP_NUM_THREADS": str(1 if overlap else args.threads), "TOKENIZERS_PARALLELISM": "false"}
    threads = {"learner_threads": args.threads, "rollout_threads": 1} if overlap else {}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    recipe = load_recipe(
        data={
            "seed": 0,
            "run_dir": str(Path(args.tmp) / "rlcpm"),
            "model": {"path": model_dir, "dtype": "float32", "device": "cpu"},
            "data": {"train": {"task": "arithmetic", "num_samples": 2000}, "apply_chat_template": False},
            "rewards": [{"name": "math"}],
            "algorithm": {"name": "grpo", "groups_per_step": args.prompts, "dynamic_sampling": False,
                          "kl_coef": 0.0, "overlong_filter": False},
            "rollout": {"n_samples": args.samples, "max_new_tokens": args.max_new_tokens, "max_batch_seqs": 256,
                        "max_staleness": 1 if overlap else 0, "dtype": args.dtype},
            "learner": {"lr": 1e-6, "total_steps": args.steps, "micro_batch_tokens": 16384,
                        "precision": "bf16-mixed" if args.dtype == "bfloat16" else "float32",
                        "checkpoint": {"every_steps": 10_000, "save_final": False}},
            "logging": {"wandb": {"mode": "disabled"}, "progress": False, "samples_every": 0},
            "cluster": {"num_cpus": 2, "reward_workers": 1, **threads},
        }
    )  # fmt: skip
    history = train(recipe).history
    ray.shutdown()
    return [row["perf/step_time_s"] for row in history if "perf/step_time_s" in row]


def child(system: str, model_dir: str, args) -> None:
    if system == "trl":
        times = run_trl(model_dir, args)
    else:
        times = run_rlcpm(model_dir, args, overlap=system == "rlcpm-overlap")
    print("RESULT " + json.dumps(times))


SYSTEMS = ("trl", "rlcpm", "rlcpm-overlap")


def run_child(system: str, model_dir: Path, tmp: str, args) -> list[float]:
    """One process of `system` (in a fresh directory under tmp): its step times."""
    workdir = tempfile.mkdtemp(dir=tmp)
    cmd = [sys.executable, "-m", "benchmarks.vs_trl", "--child", system, str(model_dir), "--tmp", workdir,
           *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
             if k not in ("child", "tmp") and v is not None]]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{system} failed:\n{out.stderr[-4000:]}")
    times = json.loads(lines[-1][len("RESULT ") :])
    print(f"{system}: " + " ".join(f"{t:.1f}" for t in times) + " s", flush=True)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1, help="first steps of each process left out")
    parser.add_argument("--rounds", type=int, default=2, help="processes per system, in ABC CBA order")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--child", nargs=2, metavar=("SYSTEM", "MODEL_DIR"))
    parser.add_argument("--tmp", default=None)
    args = parser.parse_args(argv)
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup ({args.warmup}) must leave steps to time: 0 <= warmup < --steps")
    if args.child:
        child(args.child[0], args.child[1], args)
        return {}

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp), args)
        from rlcpm.models import load_model

        num_params = sum(p.numel() for p in load_model(model_dir).parameters())
        runs: dict[str, list[list[float]]] = {system: [] for system in SYSTEMS}
        for round_index in range(args.rounds):  # ABC CBA ...: a drift of the VM's speed hits every system alike
            order = SYSTEMS if round_index % 2 == 0 else SYSTEMS[::-1]
            for system in order:
                runs[system].append(run_child(system, model_dir, tmp, args))
        results = {
            system: {
                "step_times_s": times,
                "mean_step_time_s": statistics.fmean(t for run in times for t in run[args.warmup :]),
            }
            for system, times in runs.items()
        }
    ratio = results["trl"]["mean_step_time_s"] / results["rlcpm"]["mean_step_time_s"]
    ratio_overlap = results["trl"]["mean_step_time_s"] / results["rlcpm-overlap"]["mean_step_time_s"]
    print(f"model: {num_params / 1e6:.1f}M params; {args.prompts} prompts x {args.samples} samples, "
          f"{args.max_new_tokens} new tokens; {args.threads} threads")  # fmt: skip
    print(f"{'system':>8} {'step s':>8}")
    for system, r in results.items():
        print(f"{system:>8} {r['mean_step_time_s']:8.2f}")
    print(f"rlcpm is {ratio:.2f}x faster per GRPO step ({ratio_overlap:.2f}x with one-step overlap)")
    result = {
        "benchmark": "vs_trl",
        "setup": {"params_m": round(num_params / 1e6, 2), "prompts": args.prompts, "samples": args.samples,
                  "max_new_tokens": args.max_new_tokens, "steps": args.steps, "warmup_excluded": args.warmup, "rounds": args.rounds,
                  "threads": args.threads, "dtype": args.dtype, "stop": "EOS only"},
        "results": results,
        "speedup_rlcpm_over_trl": ratio,
        "speedup_rlcpm_overlap_over_trl": ratio_overlap,
        "machine": machine_info(threads=args.threads),
    }  # fmt: skip
    name = "vs_trl" if args.dtype == "float32" else f"vs_trl_{args.dtype}"
    print(f"wrote {write_result(name, result)}")
    return result


if __name__ == "__main__":
    main()
