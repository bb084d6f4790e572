"""Decode throughput of the rlcpm engine vs transformers `generate`, side by side in one run.

    python -m benchmarks.engine_vs_hf                       # tiny + small, batch 1/8/32
    python -m benchmarks.engine_vs_hf --models tiny --batches 32 --repeats 3 --threads 1
    python -m benchmarks.engine_vs_hf --dtype bfloat16      # both systems in bfloat16

Both systems run the same random llama checkpoint (float32 by default, or both in bfloat16:
the CPU's packed bfloat16 matmuls are 2.5-4.4x faster at decode shapes on this machine), greedy, prompt 128 tokens,
256 new tokens with EOS ignored (the engine: ignore_eos; transformers: no eos_token_id).
Each measurement runs in a fresh subprocess (so peak RSS is its own) that warms up, then
times a 1-token generation (prefill) and a 256-token one; decode throughput is
batch * 255 / (t_256 - t_1), end-to-end throughput batch * 256 / t_256. The systems alternate
and the best of ``--repeats`` runs counts (the machine may be shared). The same ratio over
process CPU time is recorded too (``decode_ratio_cpu_time``): with one thread it discounts
time the process spent waiting for a core on a shared machine. Prints a table and writes
benchmarks/results/engine_vs_hf.json (engine_vs_hf_bfloat16.json) with the machine
description and the load average. In bfloat16 the two systems round differently, so their
greedy tokens part ways after a while (``greedy_tokens_agree_before``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    # ~3.1M parameters
    "tiny": dict(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=8192,
    ),
    # ~50M parameters
    "small": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=24000,
    ),
}
RESULTS = Path(__file__).parent / "results" / "engine_vs_hf.json"


# ------------------------------------------------------------------------------ one measurement


def _measure(
    system: str, model_dir: str, batch: int, prompt_len: int, new_tokens: int, threads: int, dtype: str
) -> dict:
    """Runs inside the subprocess: load, warm up, time 1 and `new_tokens` new tokens."""
    import torch

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    prompts = torch.randint(0, vocab, (batch, prompt_len), generator=generator)
    if system == "hf":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
        model.generation_config.eos_token_id = None

        def generate(n: int) -> list[int]:
            with torch.inference_mode():
                out = model.generate(
                    prompts,
                    attention_mask=torch.ones_like(prompts),
                    max_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                )
            return out[0, prompt_len:].tolist()
    else:
        from rlcpm.rollout import Engine, SamplingParams

        block_size = 16
        blocks = batch * -(-(prompt_len + new_tokens) // block_size)
        engine = Engine.from_pretrained(
            model_dir,
            dtype=dtype,
            max_num_seqs=batch,
            max_num_batched_tokens=max(batch * prompt_len, 512),
            block_size=block_size,
            kv_budget_bytes=blocks * _block_bytes(model_dir, block_size, dtype),
        )
        token_lists = prompts.tolist()

        def generate(n: int) -> list[int]:
            params = SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)
            return engine.generate(token_lists, params)[0].token_ids

    generate(4)  # warm-up
    start, cpu_start = time.perf_counter(), time.process_time()
    generate(1)
    t_first, cpu_first = time.perf_counter() - start, time.process_time() - cpu_start
    start, cpu_start = time.perf_counter(), time.process_time()
    tokens = generate(new_tokens)
    t_full, cpu_full = time.perf_counter() - start, time.process_time() - cpu_start
    assert len(tokens) == new_tokens, f"{system} generated {len(tokens)} tokens, expected {new_tokens}"
    return {
        "t_first_s": t_first,
        "t_full_s": t_full,
        "cpu_first_s": cpu_first,
        "cpu_full_s": cpu_full,
        "peak_rss_mb": _peak_rss_mb(),
        "first_row_tokens": tokens,
    }


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: reset by exec, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _block_bytes(model_dir: str, block_size: int, dtype: str) -> int:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    element_size = 2 if dtype == "bfloat16" else 4
    return (
        2 * config["num_hidden_layers"] * block_size * config["num_key_value_heads"] * head_dim * element_size
    )


def _run_child(system: str, model_dir: str, batch: int, args) -> dict:
    command = [
        sys.executable,
        "-m",
        "benchmarks.engine_vs_hf",
        "--child",
        system,
        model_dir,
        str(batch),
        "--prompt-len",
        str(args.prompt_len),
        "--new-tokens",
        str(args.new_tokens),
        "--threads",
        str(args.threads),
        "--dtype",
        args.dtype,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{system} batch {batch} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------- driver


def _machine(threads: int) -> dict:
    import torch
    import transformers

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average_1_5_15min": list(os.getloadavg()),
    }


def _build_models(names: list[str], root: Path) -> dict[str, tuple[str, float]]:
    from rlcpm.models import load_model
    from rlcpm.models.tiny import build_tiny_model_dir

    dirs = {}
    for name in names:
        path = build_tiny_model_dir(
            root / name, "llama", max_position_embeddings=1024, seed=0, **MODELS[name]
        )
        num_params = sum(p.numel() for p in load_model(path).parameters())
        dirs[name] = (str(path), num_params / 1e6)
    return dirs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="tiny,small")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--out", default=None, help="result file (default: results/engine_vs_hf[_bfloat16].json)"
    )
    parser.add_argument("--child", nargs=3, metavar=("SYSTEM", "MODEL_DIR", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is None:
        import torch

        args.threads = torch.get_num_threads()
    if args.child:
        system, model_dir, batch = args.child
        print(
            json.dumps(
                _measure(
                    system, model_dir, int(batch), args.prompt_len, args.new_tokens, args.threads, args.dtype
                )
            )
        )
        return

    batches = [int(b) for b in args.batches.split(",")]
    load_at_start = list(os.getloadavg())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = _build_models(args.models.split(","), Path(tmp))
        for name, (model_dir, params_m) in models.items():
            for batch in batches:
                runs: dict[str, list[dict]] = {"hf": [], "engine": []}
                for _ in range(args.repeats):
                    for system in ("hf", "engine"):
                        runs[system].append(_run_child(system, model_dir, batch, args))
                row = {"model": name, "params_m": round(params_m, 1), "batch": batch}
                for system, measured in runs.items():
                    best = min(measured, key=lambda m: m["t_full_s"] - m["t_first_s"])
                    decode_s = best["t_full_s"] - best["t_first_s"]
                    cpu_decode_s = min(m["cpu_full_s"] - m["cpu_first_s"] for m in measured)
                    row[system] = {
                        "decode_tok_s": batch * (args.new_tokens - 1) / decode_s,
                        "decode_tok_per_cpu_s": batch * (args.new_tokens - 1) / cpu_decode_s,
                        "end_to_end_tok_s": batch * args.new_tokens / min(m["t_full_s"] for m in measured),
                        "prefill_s": min(m["t_first_s"] for m in measured),
                        "peak_rss_mb": max(m["peak_rss_mb"] for m in measured),
                    }
                tokens = [runs[s][0]["first_row_tokens"] for s in ("hf", "engine")]
                agree = next((i for i, (a, b) in enumerate(zip(*tokens)) if a != b), len(tokens[0]))
                row["greedy_tokens_agree_before"] = agree
                row["decode_ratio"] = row["engine"]["decode_tok_s"] / row["hf"]["decode_tok_s"]
                row["decode_ratio_cpu_time"] = (
                    row["engine"]["decode_tok_per_cpu_s"] / row["hf"]["decode_tok_per_cpu_s"]
                )
                row["end_to_end_ratio"] = row["engine"]["end_to_end_tok_s"] / row["hf"]["end_to_end_tok_s"]
                rows.append(row)
                _print_row(row, header=len(rows) == 1)
    result = {
        "benchmark": "engine_vs_hf",
        "machine": {**_machine(args.threads), "load_average_at_start": load_at_start},
        "settings": {
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "dtype": args.dtype,
            "repeats": args.repeats,
            "greedy": True,
            "ignore_eos": True,
        },
        "results": rows,
    }
    out = Path(
        args.out
        or (RESULTS if args.dtype == "float32" else RESULTS.with_stem(f"{RESULTS.stem}_{args.dtype}"))
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


def _print_row(row: dict, header: bool) -> None:
    if header:
        print(
            f"{'model':>6} {'params':>7} {'batch':>5} | {'HF decode':>10} {'engine':>10} {'ratio':>6} "
            f"{'(cpu)':>6} | {'HF e2e':>9} {'engine':>9} {'ratio':>6} | {'HF MB':>7} {'eng MB':>7}"
        )
    hf, engine = row["hf"], row["engine"]
    print(
        f"{row['model']:>6} {row['params_m']:>6}M {row['batch']:>5} | {hf['decode_tok_s']:>10.0f} "
        f"{engine['decode_tok_s']:>10.0f} {row['decode_ratio']:>5.2f}x {row['decode_ratio_cpu_time']:>5.2f}x | "
        f"{hf['end_to_end_tok_s']:>9.0f} {engine['end_to_end_tok_s']:>9.0f} {row['end_to_end_ratio']:>5.2f}x | "
        f"{hf['peak_rss_mb']:>7.0f} {engine['peak_rss_mb']:>7.0f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
