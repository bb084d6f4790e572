"""Chunk-wise rollout vs synchronous rollout on a long-tail length workload (MiniCPM4 §3.2).

The workload: a tiny random model whose responses end when it samples one of a few stop ids
(about 2% per token), so lengths are geometric with a mean near max/5 and a tail that reaches
the limit: every synchronous step waits for its longest response. Same engine, same learner,
same number of finished groups per step (dynamic sampling off); `chunk_tokens` in
{None, max/2, max/4, max/8}. Reports mean step and sampling time over the steady-state steps
and their ratios to synchronous, side by side in one run.

    python -m benchmarks.chunked_vs_sync [--steps 8] [--max-new-tokens 256]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import machine_info, write_result


def build_model(root: Path) -> Path:
    from rlcpm.models.tiny import build_tiny_model_dir

    return build_tiny_model_dir(
        root / "model", "llama", hidden_size=128, intermediate_size=384, num_hidden_layers=4, seed=0
    )


def run_mode(model_dir: Path, run_dir: Path, chunk_tokens: int | None, args) -> dict:
    from rlcpm.config import load_recipe
    from rlcpm.trainer import train

    # ~2% of a near-uniform 512-token distribution: geometric lengths, mean ~50 tokens.
    stop_ids = list(range(7, 512, 48))
    recipe = load_recipe(
        data={
            "seed": 0,
            "run_dir": str(run_dir),
            "model": {"path": str(model_dir), "dtype": "float32", "device": "cpu"},
            "data": {"train": {"task": "arithmetic", "num_samples": 2000}, "apply_chat_template": False},
            "rewards": [{"name": "math"}],
            "algorithm": {"name": "grpo", "groups_per_step": args.groups, "dynamic_sampling": False, "kl_coef": 0.0},
            "rollout": {
                "n_samples": args.samples,
                "max_new_tokens": args.max_new_tokens,
                "chunk_tokens": chunk_tokens,
                "stop_token_ids": stop_ids,
                "max_batch_seqs": 256,
            },
            "learner": {"lr": 1e-5, "total_steps": args.steps, "checkpoint": {"every_steps": 10_000, "save_final": False}},
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the means")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args(argv)

    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp))
        m = args.max_new_tokens
        for chunk in (None, m // 2, m // 4, m // 8):
            rows.append(run_mode(model_dir, Path(tmp) / f"run-{chunk}", chunk, args))
    ray.shutdown()
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
            "model": "llama, hidden 128, 4 layers, random weights, vocab 512",
            "lengths": "geometric (stop ids ~2% per token), capped at max_new_tokens",
            "groups_per_step": args.groups,
            "samples_per_group": args.samples,
            "max_new_tokens": args.max_new_tokens,
            "steps": args.steps,
            "warmup_steps_excluded": args.warmup,
        },
        "rows": rows,
        "best_sampling_speedup": max(r["sampling_speedup"] for r in rows[1:]),
        "machine": machine_info(threads=1),
    }
    print(f"wrote {write_result('chunked_vs_sync', result)}")
    return result


if __name__ == "__main__":
    main()
