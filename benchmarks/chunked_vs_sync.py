"""Chunk-wise rollout vs synchronous rollout on a long-tail length workload (MiniCPM4 §3.2).

The workload: a tiny llama (hidden 128, 4 layers) whose weights make its responses a Markov
chain with a heavy length tail, like reasoning RL where a few responses run to the limit while
most end early. Its attention and MLP branches write zeros into the residual stream (o_proj and
down_proj are 0, so every layer still computes everything), and the embedding and LM head are
set so the next-token distribution depends only on the class of the current token:

    prompt token -> "short" token 94%, "long" token 6%
    short        -> short 90%, stop 10%                 (mean ~10 tokens)
    long         -> long 99.8%, stop 0.2%               (most reach max_new_tokens)

The response classes use ids above the tokenizer's (the model's vocabulary is 1024 rows for a
512-token tokenizer), so no prompt token is one of them. A group (G samples of a prompt) has a
long response with probability 1 - 0.94^G (39% for G = 8): every synchronous step waits for it,
with the batch down to a few sequences for most of its decoding steps. Same engine, same
learner, same number of finished groups per step (dynamic sampling off; the math reward is 0
for these responses, so advantages are 0 and the weights never change); `chunk_tokens` in
{None, max/2, max/4, max/8}, each run `--rounds` times in the order none, max/2, max/4, max/8,
then reversed (the VM's speed drifts over minutes). Reports mean step and sampling time over
the steady-state steps of every run and their ratios to synchronous, side by side in one run. Chunking pays for its speed-up with
re-prefill: a trajectory carried over a weight update recomputes its KV under the new weights,
which on a CPU costs a good fraction of decoding the same tokens (on a GPU, far less).

    python -m benchmarks.chunked_vs_sync [--steps 10] [--max-new-tokens 512] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import machine_info, write_result

TOKENIZER_SIZE, VOCAB_SIZE = 512, 1024
SHORT_IDS, LONG_IDS, STOP_IDS = range(512, 768), range(768, 1016), range(1016, 1024)
# class -> probability of moving to each response class (rows sum to 1)
TRANSITIONS = {
    "prompt": {"short": 0.94, "long": 0.06, "stop": 0.0},
    "short": {"short": 0.90, "long": 0.0, "stop": 0.10},
    "long": {"short": 0.0, "long": 0.998, "stop": 0.002},
}
NEVER = -30.0  # logit of a transition that must not happen (prompt ids as outputs included)


def build_model(root: Path, hidden: int = 128, layers: int = 4) -> Path:
    """The long-tail Markov-chain llama described in the module docstring."""
    import torch
    from safetensors.torch import load_file, save_file

    from rlcpm.models.tiny import build_tiny_model_dir

    path = build_tiny_model_dir(
        root / "model", "llama", hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers, seed=0,
        tokenizer_vocab_size=TOKENIZER_SIZE, vocab_size=VOCAB_SIZE,
    )  # fmt: skip
    tensors = load_file(str(path / "model.safetensors"))
    hidden = tensors["model.norm.weight"].shape[0]
    for name, tensor in tensors.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            tensor.zero_()  # the residual stream stays the token's embedding
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
    classes = {"prompt": range(TOKENIZER_SIZE), "short": SHORT_IDS, "long": LONG_IDS, "stop": STOP_IDS}
    directions = torch.eye(hidden)[: len(classes)]  # one orthonormal direction per input class
    embed = tensors["model.embed_tokens.weight"]
    head = torch.zeros_like(tensors["lm_head.weight"])
    for index, ids in enumerate(classes.values()):
        embed[list(ids)] = directions[index]  # after RMSNorm: sqrt(hidden) * direction
    for index, row in enumerate([*TRANSITIONS.values(), TRANSITIONS["short"]]):  # rows in class order
        for target in ("short", "long", "stop"):
            # logit of each id of `target` = log(p / number of ids), so the class gets p
            ids = classes[target]
            logit = math.log(row[target] / len(ids)) if row[target] > 0 else NEVER
            head[list(ids)] += directions[index] * logit / math.sqrt(hidden)
        head[list(classes["prompt"])] += directions[index] * NEVER / math.sqrt(hidden)
    tensors["lm_head.weight"] = head
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def run_mode(model_dir: Path, run_dir: Path, chunk_tokens: int | None, args) -> dict:
    from rlcpm.config import load_recipe
    from rlcpm.trainer import train

    stop_ids = list(STOP_IDS)
    recipe = load_recipe(
        data={
            "seed": 0,
            "run_dir": str(run_dir),
            "model": {"path": str(model_dir), "dtype": "float32", "device": "cpu"},
            "data": {"train": {"task": "arithmetic", "num_samples": 2000}, "apply_chat_template": False},
            "rewards": [{"name": "math"}],
            "algorithm": {
                "name": "grpo",
                "groups_per_step": args.groups,
                "dynamic_sampling": False,
                "kl_coef": 0.0,
            },
            "rollout": {
                "n_samples": args.samples,
                "max_new_tokens": args.max_new_tokens,
                "chunk_tokens": chunk_tokens,
                "stop_token_ids": stop_ids,
                "max_batch_seqs": 256,
                "dtype": args.dtype,
            },
            "learner": {
                "lr": 1e-5,
                "total_steps": args.steps,
                "checkpoint": {"every_steps": 10_000, "save_final": False},
            },
            "logging": {"wandb": {"mode": "disabled"}, "progress": False, "samples_every": 0},
            "cluster": {"num_cpus": 2, "reward_workers": 1},
        }
    )
    history = [row for row in train(recipe).history if "perf/step_time_s" in row]
    steady = history[args.warmup :]

    def mean(key: str) -> float:
        return statistics.fmean(row[key] for row in steady)

    return {
        "chunk_tokens": chunk_tokens,
        "step_time_s": mean("perf/step_time_s"),
        "sampling_time_s": mean("perf/sampling_time_s"),
        "rounds_per_step": mean("rollout/rounds"),
        "generated_tokens_per_step": mean("rollout/generated_tokens"),
        "trained_response_len_mean": mean("rollout/response_len_mean"),
        "multi_version_fraction": mean("rollout/multi_version_fraction"),
        "staleness_mean": mean("rollout/staleness_mean"),
    }


def _pooled(rounds: list[dict]) -> dict:
    """One mode's rows of every round -> their means, with the sampling time of each round."""
    row = {key: statistics.fmean(r[key] for r in rounds) for key in rounds[0] if key != "chunk_tokens"}
    return {"chunk_tokens": rounds[0]["chunk_tokens"], **row,
            "sampling_time_s_per_round": [r["sampling_time_s"] for r in rounds]}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the means")
    parser.add_argument("--rounds", type=int, default=2, help="runs per mode, in ABCD DCBA order")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="the engines' dtype"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup ({args.warmup}) must leave steps to time: 0 <= warmup < --steps")

    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})  # fmt: skip
    m = args.max_new_tokens
    chunks = (None, m // 2, m // 4, m // 8)
    runs: dict = {chunk: [] for chunk in chunks}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp))
        for round_index in range(args.rounds):  # ABCD DCBA ...: a drift of the VM's speed hits every mode alike
            for chunk in chunks if round_index % 2 == 0 else chunks[::-1]:
                runs[chunk].append(run_mode(model_dir, Path(tmp) / f"run-{chunk}-{round_index}", chunk, args))
    ray.shutdown()
    rows = [_pooled(runs[chunk]) for chunk in chunks]
    sync = rows[0]
    for row in rows:
        row["sampling_speedup"] = sync["sampling_time_s"] / row["sampling_time_s"]
        row["step_speedup"] = sync["step_time_s"] / row["step_time_s"]
    print(f"{'chunk_tokens':>12} {'step s':>8} {'sample s':>9} {'rounds':>7} {'tok/step':>9} "
          f"{'x step':>7} {'x sample':>9} {'multi-ver':>9}")  # fmt: skip
    for r in rows:
        print(f"{str(r['chunk_tokens']):>12} {r['step_time_s']:8.2f} {r['sampling_time_s']:9.2f} "
              f"{r['rounds_per_step']:7.1f} {r['generated_tokens_per_step']:9.0f} {r['step_speedup']:7.2f} "
              f"{r['sampling_speedup']:9.2f} {r['multi_version_fraction']:9.2f}")  # fmt: skip
    result = {
        "benchmark": "chunked_vs_sync",
        "workload": {
            "model": "llama, hidden 128, 4 layers, vocab 1024: the long-tail Markov chain of the module docstring",
            "transitions": TRANSITIONS,
            "lengths": "94% short (mean ~10 tokens), 6% long (stop 0.2% per token), capped at max_new_tokens",
            "groups_per_step": args.groups,
            "samples_per_group": args.samples,
            "max_new_tokens": args.max_new_tokens,
            "steps": args.steps,
            "warmup_steps_excluded": args.warmup,
            "rounds": args.rounds,
            "rollout_dtype": args.dtype,
        },
        "rows": rows,
        "best_sampling_speedup": max(r["sampling_speedup"] for r in rows[1:]),
        "machine": machine_info(threads=1),
    }
    name = "chunked_vs_sync" if args.dtype == "float32" else f"chunked_vs_sync_{args.dtype}"
    print(f"wrote {write_result(name, result)}")
    return result


if __name__ == "__main__":
    main()
