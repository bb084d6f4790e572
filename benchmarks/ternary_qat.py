"""Outcome of BitCPM ternary QAT on the quickstart task: held-out accuracy, full precision vs ternary.

    python -m benchmarks.ternary_qat                          # defaults below, ~1 h on 2 busy cores
    python -m benchmarks.ternary_qat --demo-noise 0.4 --epochs 2

1. Start: the quickstart's starting model, rlcpm's SFT of a tiny llama on synthetic arithmetic
   (recipes/quickstart_sft.yaml, built once into .cache/rlcpm/quickstart-sft as `rlcpm
   quickstart` does).
2. From that checkpoint, two runs of rlcpm's own SFT loop with the same data, steps and
   learning rate: a full-precision control, and QAT (`learner.qat`, learning-rate re-warmup),
   whose final model is the packed ternary export. Equal training makes the comparison fair:
   QAT also trains further, so comparing it with the start would flatter it.
3. Greedy held-out accuracy (the quickstart's held-out arithmetic partition, math reward) of:
   the start; the start ternarized without training (post-training quantization = the QAT
   run's step 0); the full-precision control; the QAT model as trained (engine fed W_q); and the
   packed export loaded by `load_model` (TernaryLinear layers, ternary matmul).

`--demo-noise` sets the share of wrong demonstrations in the continued SFT data (the quickstart
start was trained with 0.4 to leave RL headroom). The task is the quickstart's (its SFT recipe's
arithmetic options) unless `--task-options '{"num_steps": 1}'` (JSON) replaces them; then the
start is trained here with the quickstart SFT recipe on that task instead of taken from the cache.
Writes benchmarks/results/ternary_qat.json (or --out); the claim checked is packed QAT accuracy
>= 90% of the full-precision control's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import machine_info

RESULTS = Path(__file__).parent / "results" / "ternary_qat.json"
SFT_RECIPE = Path("recipes/quickstart_sft.yaml")
SFT_MODEL = Path(".cache/rlcpm/quickstart-sft")


def heldout(options: dict) -> dict:
    return {
        "task": "arithmetic",
        "num_samples": 200,
        "seed": 1,
        "options": {**options, "partition": "heldout"},
    }


def heldout_accuracy(model_dir: Path, tokenizer_dir: Path, options: dict, max_new_tokens: int = 48) -> float:
    """Greedy accuracy of the model directory on the held-out prompts (dense or packed model)."""
    from transformers import AutoTokenizer

    from rlcpm.config import load_recipe
    from rlcpm.data import load_examples
    from rlcpm.rewards import math as math_reward
    from rlcpm.rollout import Engine, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    data = load_recipe(SFT_RECIPE, [f"data.eval={json.dumps(heldout(options))}"]).data
    examples = load_examples(data, "eval", tokenizer).examples
    engine = Engine.from_pretrained(str(model_dir), tokenizer_path=str(tokenizer_dir), dtype="float32")
    prompts = [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in examples]
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
    texts = [tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outputs]
    return sum(math_reward.score(text, e.answer) for text, e in zip(texts, examples)) / len(examples)


def quickstart_options() -> dict:
    """The arithmetic generator options of the quickstart's SFT recipe (its task, not its split)."""
    from rlcpm.config import load_recipe

    options = dict(load_recipe(SFT_RECIPE).data.train.options)
    return {k: v for k, v in options.items() if k not in ("partition", "demo_noise")}


def start_model(args: argparse.Namespace, options: dict) -> Path:
    """The full-precision start: the cached quickstart SFT model, or one trained on `options`."""
    from rlcpm.config import load_recipe
    from rlcpm.quickstart import build_starting_model
    from rlcpm.trainer import train

    if options == quickstart_options():
        if not (SFT_MODEL / "config.json").is_file():
            build_starting_model(SFT_MODEL, SFT_RECIPE)
        return SFT_MODEL
    final = Path(args.run_dir) / "start" / "final"
    if not (final / "config.json").is_file():
        train_data = {
            "task": "arithmetic",
            "num_samples": 12000,
            "seed": 0,
            "options": {**options, "partition": "train"},
        }
        train(load_recipe(SFT_RECIPE, [f"run_dir={final.parent}", f"data.train={json.dumps(train_data)}"]))
    return final


def continued_sft(args: argparse.Namespace, start: Path, options: dict, run_dir: str, qat: dict | None):
    """rlcpm SFT from the start checkpoint (TrainResult); `qat` switches learner.qat on."""
    from rlcpm.config import load_recipe
    from rlcpm.trainer import train

    train_data = {
        "task": "arithmetic",
        "num_samples": args.num_samples,
        "seed": 2,
        "options": {**options, "partition": "train", "demo_noise": args.demo_noise},
    }
    overrides = [
        f"run_dir={run_dir}",
        f"model.path={start}",
        "model.tiny=null",
        f"data.train={json.dumps(train_data)}",
        f"data.eval={json.dumps(heldout(options))}",
        "eval.greedy=true",
        "eval.num_prompts=200",
        f"algorithm.epochs={args.epochs}",
        f"learner.lr={args.lr}",
        f"learner.schedule.warmup_steps={args.rewarmup_steps}",  # the same warmup in both runs
        f"learner.qat={json.dumps(qat)}",
        "rollout.max_new_tokens=48",
    ]
    return train(load_recipe(SFT_RECIPE, overrides))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-samples", type=int, default=6000, help="continued-SFT demonstrations")
    parser.add_argument("--demo-noise", type=float, default=0.0, help="share of wrong demonstrations")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--rewarmup-steps", type=int, default=20)
    parser.add_argument(
        "--task-options", default=None, help="arithmetic generator options (JSON); default: the quickstart's"
    )
    parser.add_argument("--run-dir", default="runs/ternary_qat")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    torch.set_num_threads(min(2, torch.get_num_threads()))
    options = json.loads(args.task_options) if args.task_options else quickstart_options()
    start = start_model(args, options)
    start_accuracy = heldout_accuracy(start, start, options)

    started = time.perf_counter()
    control = continued_sft(args, start, options, f"{args.run_dir}/full_precision", None)
    control_seconds = time.perf_counter() - started
    control_accuracy = heldout_accuracy(control.final_model_dir, start, options)

    started = time.perf_counter()
    qat_cfg = {"group_size": args.group_size, "rewarmup_steps": args.rewarmup_steps}
    qat = continued_sft(args, start, options, f"{args.run_dir}/qat", qat_cfg)
    qat_seconds = time.perf_counter() - started
    packed_accuracy = heldout_accuracy(qat.final_model_dir, start, options)

    report = {
        "task": "quickstart arithmetic, held-out partition (200 prompts), greedy, math reward",
        "model": "recipes/quickstart_sft.yaml start (tiny llama: 4 layers, hidden 128), float32",
        "start": str(start),
        "task_options": options,
        "continued_sft": {
            "num_samples": args.num_samples,
            "demo_noise": args.demo_noise,
            "epochs": args.epochs,
            "lr": args.lr,
            "warmup_steps": args.rewarmup_steps,
            "steps": qat.summary.get("train/steps"),
            "qat_group_size": args.group_size,
        },
        "accuracy_start_full_precision": start_accuracy,
        "accuracy_start_ternarized_no_qat": qat.summary.get("eval/accuracy_before"),
        "accuracy_full_precision_control": control_accuracy,
        "accuracy_qat_as_trained": qat.summary.get("eval/accuracy"),
        "accuracy_qat_packed_export": packed_accuracy,
        "qat_over_full_precision": packed_accuracy / control_accuracy if control_accuracy else None,
        "seconds_full_precision_control": control_seconds,
        "seconds_qat": qat_seconds,
        "machine": machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for key, value in report.items():
        print(f"{key:>34}: {value}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
