"""Outcome of BitCPM ternary QAT on the quickstart task: held-out accuracy, full precision vs ternary.

    python -m benchmarks.ternary_qat                 # SFT start (cached) -> QAT SFT -> packed export
    python -m benchmarks.ternary_qat --epochs 1 --lr 1e-3

1. The quickstart's starting model: rlcpm's SFT of a tiny llama on synthetic arithmetic
   (recipes/quickstart_sft.yaml, built once into .cache/rlcpm/quickstart-sft, as `rlcpm quickstart` does).
2. QAT from it with rlcpm's own SFT loop (the same recipe with `learner.qat` on, starting from
   the SFT checkpoint; the learning rate re-warms up), exported as a packed ternary model.
3. Greedy held-out accuracy (the quickstart's held-out arithmetic partition, math reward) of:
   the full-precision SFT model; the same weights ternarized without training (post-training
   quantization, the QAT run's step 0); the QAT model as trained (engine fed W_q); and the
   packed export loaded by `load_model` (TernaryLinear layers, ternary matmul).

Writes benchmarks/results/ternary_qat.json; the claim checked is QAT >= 90% of full precision.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "ternary_qat.json"
SFT_RECIPE = Path("recipes/quickstart_sft.yaml")
SFT_MODEL = Path(".cache/rlcpm/quickstart-sft")
HELDOUT = {"task": "arithmetic", "num_samples": 200, "seed": 1, "options": {"partition": "heldout"}}


def heldout_accuracy(model_dir: Path, tokenizer_dir: Path, max_new_tokens: int = 48) -> float:
    """Greedy accuracy of the model directory on the held-out prompts (dense or packed model)."""
    from transformers import AutoTokenizer

    from rlcpm.config import load_recipe
    from rlcpm.data import load_examples
    from rlcpm.rewards import math as math_reward
    from rlcpm.rollout import Engine, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    data = load_recipe(SFT_RECIPE, [f"data.eval={json.dumps(HELDOUT)}"]).data
    examples = load_examples(data, "eval", tokenizer).examples
    engine = Engine.from_pretrained(str(model_dir), tokenizer_path=str(tokenizer_dir), dtype="float32")
    prompts = [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in examples]
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
    texts = [tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outputs]
    return sum(math_reward.score(text, e.answer) for text, e in zip(texts, examples)) / len(examples)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--epochs", type=float, default=2.0, help="QAT epochs over the SFT data (BitCPM: ~2x)"
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--rewarmup-steps", type=int, default=20)
    parser.add_argument("--run-dir", default="runs/ternary_qat")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from rlcpm.config import load_recipe
    from rlcpm.quickstart import build_starting_model
    from rlcpm.trainer import train

    torch.set_num_threads(min(2, torch.get_num_threads()))
    started = time.perf_counter()
    if not (SFT_MODEL / "config.json").is_file():
        build_starting_model(SFT_MODEL, SFT_RECIPE)
    sft_seconds = time.perf_counter() - started
    full_precision = heldout_accuracy(SFT_MODEL, SFT_MODEL)

    overrides = [
        f"run_dir={args.run_dir}",
        f"model.path={SFT_MODEL}",
        "model.tiny=null",
        f"data.eval={json.dumps(HELDOUT)}",
        "eval.greedy=true",
        "eval.num_prompts=200",
        f"algorithm.epochs={args.epochs}",
        f"learner.lr={args.lr}",
        f"learner.qat={json.dumps({'group_size': args.group_size, 'rewarmup_steps': args.rewarmup_steps})}",
        "rollout.max_new_tokens=48",
    ]
    started = time.perf_counter()
    result = train(load_recipe(SFT_RECIPE, overrides))
    qat_seconds = time.perf_counter() - started
    packed = heldout_accuracy(result.final_model_dir, SFT_MODEL)
    summary = result.summary
    report = {
        "task": "quickstart arithmetic, held-out partition, 200 prompts, greedy, math reward",
        "model": "recipes/quickstart_sft.yaml (tiny llama: 4 layers, hidden 128)",
        "qat": {
            "group_size": args.group_size,
            "epochs": args.epochs,
            "lr": args.lr,
            "rewarmup_steps": args.rewarmup_steps,
            "steps": summary.get("train/steps"),
        },
        "accuracy_full_precision_sft": full_precision,
        "accuracy_ternary_no_qat": summary.get("eval/accuracy_before"),
        "accuracy_ternary_qat": summary.get("eval/accuracy"),
        "accuracy_ternary_packed_export": packed,
        "retained_fraction": packed / full_precision if full_precision else None,
        "sft_build_seconds": sft_seconds,
        "qat_seconds": qat_seconds,
        "torch_threads": torch.get_num_threads(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for key, value in report.items():
        print(f"{key:>32}: {value}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
