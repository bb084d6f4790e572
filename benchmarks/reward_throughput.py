"""Reward throughput: sandboxed code programs/s vs concurrency and Ray pool size, math checks/s.

    python -m benchmarks.reward_throughput                  # defaults below
    python -m benchmarks.reward_throughput --programs 128 --pool-sizes 1 2 4 8

Code: each program is a small solution (3 in 4 correct; `2 * x` passes 1 of the 3 asserts), scored by
`rlcpm.rewards.code.score`; one sandbox run per program (load + 3 test units). Measured two ways:
  sandbox   code.score_many with N concurrent sandboxes (threads in this process)
  ray pool  RewardPool([{name: code}], num_workers=N): N Ray actors (actor start-up not timed)
Math: distinct (response, answer) pairs (fractions vs decimals, percentages, radicals, intervals,
equations) through math-verify worker processes, with N workers and N caller threads; the
first (warm-up) pass of parsing is not timed.

Writes benchmarks/results/reward_throughput.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import machine_info

RESULTS = Path(__file__).parent / "results" / "reward_throughput.json"
TESTS = ["assert solve(2) == 4", "assert solve(5) == 25", "assert solve(-3) == 9"]


def code_programs(count: int, seed: int = 0) -> list[str]:
    """Responses with a fenced `solve`: x * x, x ** 2, abs(x) * abs(x) (correct) or 2 * x (wrong)."""
    rng = random.Random(seed)
    bodies = ["return x * x", "return x ** 2", "return 2 * x", "return abs(x) * abs(x)"]
    return [f"Here you go:\n```python\ndef solve(x):\n    {rng.choice(bodies)}\n```" for _ in range(count)]


def math_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    makers = [
        lambda a, b: (rf"\boxed{{\frac{{{a}}}{{{b}}}}}", f"{a / b:.6g}"),
        lambda a, b: (rf"\boxed{{{a}\%}}", f"{a / 100:g}"),
        lambda a, b: (rf"\boxed{{\sqrt{{{a * a * b}}}}}", rf"{a}\sqrt{{{b}}}"),
        lambda a, b: (rf"\boxed{{[{a}, {a + b})}}", f"[{a},{a + b})"),
        lambda a, b: (rf"The answer is $x = {a + b}$.", f"{a + b}"),
        lambda a, b: (rf"\boxed{{{a}x^2 + {b}}}", f"{b} + {a}x^2"),
    ]
    return [rng.choice(makers)(rng.randint(1, 97), rng.randint(2, 13)) for _ in range(count)]


def bench_sandbox(programs: list[str], concurrency: int) -> dict:
    from rlcpm.rewards import code

    start = time.perf_counter()
    scores = code.score_many(programs, [TESTS] * len(programs), max_workers=concurrency, timeout_s=2.0)
    seconds = time.perf_counter() - start
    return {"concurrency": concurrency, "programs": len(programs), "seconds": seconds,
            "programs_per_s": len(programs) / seconds, "mean_score": sum(scores) / len(scores)}  # fmt: skip


def bench_ray_pool(programs: list[str], num_workers: int) -> dict:
    from rlcpm.rewards import RewardPool, Sample

    samples = [Sample(id=f"p{i}", response=p, fields={"tests": TESTS}) for i, p in enumerate(programs)]
    with RewardPool([{"name": "code", "kwargs": {"timeout_s": 2.0}}], num_workers=num_workers) as pool:
        pool.score(samples[: 2 * num_workers])  # warm up every worker
        start = time.perf_counter()
        results = pool.score(samples)
        seconds = time.perf_counter() - start
    return {"workers": num_workers, "programs": len(programs), "seconds": seconds,
            "programs_per_s": len(programs) / seconds, "mean_score": sum(r.total for r in results) / len(results)}  # fmt: skip


def bench_math(pairs: list[tuple[str, str]], num_workers: int) -> dict:
    from rlcpm.rewards import math as math_reward

    verifier = math_reward.MathVerifier(num_workers=num_workers)
    verifier.start()
    try:
        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            start = time.perf_counter()
            scores = list(pool.map(lambda p: math_reward.score(p[0], p[1], verifier=verifier), pairs))
            seconds = time.perf_counter() - start
    finally:
        verifier.close()
    return {"workers": num_workers, "checks": len(pairs), "seconds": seconds,
            "checks_per_s": len(pairs) / seconds, "fraction_equal": sum(scores) / len(scores)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=64)
    parser.add_argument("--pool-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--math-checks", type=int, default=120)
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray pool measurement")
    args = parser.parse_args(argv)

    from rlcpm.rewards.sandbox import detect_isolation

    programs = code_programs(args.programs)
    bench_sandbox(programs[:4], 1)  # start-up costs (interpreter probe, namespaces) out of the timings
    sandbox = [bench_sandbox(programs, n) for n in args.pool_sizes]
    ray_pool = []
    if not args.no_ray:
        import ray

        ray.init(
            num_cpus=max(args.pool_sizes),
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
        try:
            ray_pool = [bench_ray_pool(programs, n) for n in args.pool_sizes]
        finally:
            ray.shutdown()
    pairs = math_pairs(args.math_checks)
    math_sizes = sorted({1, min(2, os.cpu_count() or 1)})
    math = [bench_math(pairs, n) for n in math_sizes]

    result = {
        "machine": {**machine_info(), "load_average_1m": os.getloadavg()[0]},
        "isolation": detect_isolation().level,
        "code_tests_per_program": len(TESTS),
        "code_sandbox": sandbox,
        "code_ray_pool": ray_pool,
        "math": math,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"isolation: {result['isolation']}, cpus: {os.cpu_count()}, load {os.getloadavg()[0]:.1f}, "
        f"{len(TESTS)} asserts per program"
    )
    print(f"{'code sandbox (threads)':<28}{'programs/s':>12}{'seconds':>10}")
    for row in sandbox:
        print(f"  concurrency {row['concurrency']:<14}{row['programs_per_s']:>12.1f}{row['seconds']:>10.2f}")
    if ray_pool:
        print(f"{'code RewardPool (actors)':<28}{'programs/s':>12}{'seconds':>10}")
        for row in ray_pool:
            print(f"  workers {row['workers']:<18}{row['programs_per_s']:>12.1f}{row['seconds']:>10.2f}")
    print(f"{'math-verify':<28}{'checks/s':>12}{'seconds':>10}")
    for row in math:
        print(f"  workers {row['workers']:<18}{row['checks_per_s']:>12.1f}{row['seconds']:>10.2f}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
