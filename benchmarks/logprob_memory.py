"""Peak memory of target-token log-probs (forward + backward): chunked vs the naive float32 path.

    python -m benchmarks.logprob_memory                      # 8k tokens x 150k vocab, CPU (+ CUDA if present)
    python -m benchmarks.logprob_memory --tokens 2048 --vocab 32000 --devices cpu

Each (device, method) runs in its own subprocess, so one method's allocator state never
colours the other's. Memory is the peak during forward + backward above what was allocated
before it (hidden states, LM head weight, targets): on CPU the peak resident memory (VmHWM, reset
first) above the resident memory at the start, on CUDA torch.cuda.max_memory_allocated. Methods:

    naive     log_softmax(h W^T) in float32 over the whole [N, V], gather, autograd backward
    chunked   rlcpm.learner.logprobs.target_logprobs (log-probs AND entropies), `--chunk` rows of
              logits at a time in forward and in backward

Writes benchmarks/results/logprob_memory.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import machine_info

RESULTS = Path(__file__).parent / "results" / "logprob_memory.json"


def run_child(method: str, device: str, tokens: int, vocab: int, hidden: int, chunk: int) -> dict:
    """Measure one method in this process (called in a fresh subprocess)."""
    import torch

    from rlcpm.learner.logprobs import target_logprobs

    torch.manual_seed(0)
    hidden_states = (torch.randn(tokens, hidden, device=device) * 0.5).requires_grad_(True)
    weight = (torch.randn(vocab, hidden, device=device) * 0.05).requires_grad_(True)
    targets = torch.randint(0, vocab, (tokens,), device=device)

    def forward_backward():
        if method == "naive":
            logits = hidden_states @ weight.t()  # [N, V] float32
            logprobs = logits.log_softmax(dim=-1).gather(1, targets[:, None]).squeeze(1)
        else:
            logprobs, _ = target_logprobs(hidden_states, weight, targets, chunk_tokens=chunk)
        logprobs.sum().backward()
        return logprobs.detach()

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = _reset_peak_rss()
    started = time.perf_counter()
    logprobs = forward_backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = _proc_status_bytes("VmHWM") - baseline
    return {
        "method": method,
        "device": device,
        "peak_bytes": int(peak),
        "seconds": time.perf_counter() - started,
        "logprob_sum": float(logprobs.double().sum()),
    }


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> int:
    """Resets this process's peak RSS to its current RSS and returns that. ru_maxrss cannot be
    the baseline: it keeps the peak of the set-up (the LM head's random init makes a temporary as
    large as the weight), so its growth would leave that much of the method's peak out."""
    Path("/proc/self/clear_refs").write_text("5")
    return _proc_status_bytes("VmRSS")


def measure(method: str, device: str, args: argparse.Namespace) -> dict:
    command = [
        sys.executable, "-m", "benchmarks.logprob_memory", "--child", method, "--devices", device,
        "--tokens", str(args.tokens), "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--chunk", str(args.chunk),
    ]  # fmt: skip
    out = subprocess.run(
        command, check=True, capture_output=True, text=True, cwd=Path(__file__).parent.parent
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return f"{machine_info()['cpu']} CPU"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=150_000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument(
        "--devices", default=None, help="comma-separated; default: cpu, and cuda when available"
    )
    parser.add_argument("--child", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.child:
        print(
            json.dumps(run_child(args.child, args.devices, args.tokens, args.vocab, args.hidden, args.chunk))
        )
        return

    import torch

    devices = (
        args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    )
    rows = []
    print(f"{'device':<28} {'method':<8} {'peak MiB':>10} {'seconds':>8}")
    for device in devices:
        results = {method: measure(method, device, args) for method in ("naive", "chunked")}
        ratio = results["chunked"]["peak_bytes"] / results["naive"]["peak_bytes"]
        same = abs(results["chunked"]["logprob_sum"] - results["naive"]["logprob_sum"])
        for result in results.values():
            print(
                f"{device_name(device):<28} {result['method']:<8} {result['peak_bytes'] / 2**20:>10.0f} {result['seconds']:>8.2f}"
            )
        print(f"  chunked / naive peak memory: {ratio:.3f}  (|sum of log-prob differences| = {same:.3g})")
        rows.append(
            {
                "device": device,
                "device_name": device_name(device),
                "naive_peak_bytes": results["naive"]["peak_bytes"],
                "chunked_peak_bytes": results["chunked"]["peak_bytes"],
                "chunked_over_naive": ratio,
                "naive_seconds": results["naive"]["seconds"],
                "chunked_seconds": results["chunked"]["seconds"],
                "abs_logprob_sum_difference": same,
            }
        )
    report = {
        "benchmark": "logprob_memory",
        "tokens": args.tokens,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "chunk_tokens": args.chunk,
        "machine": machine_info(),
        "note": "peak memory of forward + backward above the inputs; each method in a fresh subprocess",
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
