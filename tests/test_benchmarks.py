"""The benchmark scripts measure what they say (small sizes; the full runs are not tests)."""

import argparse
import json

import pytest

from benchmarks import logprob_memory


def test_logprob_memory_counts_the_whole_peak_above_the_inputs():
    # The LM head's random init makes a temporary as large as the weight before forward +
    # backward; a peak measured above the set-up's peak left that much out, less than the
    # weight's own gradient.
    tokens, vocab, hidden = 64, 150_000, 256
    args = argparse.Namespace(tokens=tokens, vocab=vocab, hidden=hidden, chunk=tokens)
    chunked = logprob_memory.measure("chunked", "cpu", args)
    weight_grad, logits = vocab * hidden * 4, tokens * vocab * 4
    assert chunked["peak_bytes"] >= weight_grad + logits


def test_logprob_memory_records_the_machine_it_ran_on(tmp_path):
    from benchmarks.common import machine_info

    out = tmp_path / "logprob_memory.json"
    logprob_memory.main(["--tokens", "64", "--vocab", "1000", "--hidden", "32", "--chunk", "32",
                         "--devices", "cpu", "--out", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    cpu = machine_info()["cpu"]
    assert report["machine"]["cpu"] == cpu and report["machine"]["torch_threads"] >= 1
    assert report["results"][0]["device_name"] == f"{cpu} CPU"


def test_reward_throughput_records_the_machine_it_ran_on(tmp_path, monkeypatch):
    from benchmarks import reward_throughput
    from benchmarks.common import machine_info

    monkeypatch.setattr(reward_throughput, "RESULTS", tmp_path / "reward_throughput.json")
    reward_throughput.main(["--programs", "2", "--pool-sizes", "1", "--math-checks", "2", "--no-ray"])
    machine = json.loads((tmp_path / "reward_throughput.json").read_text())["machine"]
    assert machine["cpu"] == machine_info()["cpu"] and "load_average_1m" in machine


def test_ternary_records_the_machine_it_ran_on(tmp_path, monkeypatch):
    from benchmarks import ternary
    from benchmarks.common import machine_info

    monkeypatch.setattr(ternary, "CPU_SHAPES", [(64, 64)])
    monkeypatch.setattr(ternary, "TOKENS", [1])
    ternary.main(["--out", str(tmp_path / "ternary_cpu.json")])
    report = json.loads((tmp_path / "ternary_cpu.json").read_text())
    assert report["machine"]["cpu"] == machine_info()["cpu"] and report["machine"]["torch_threads"] == 1


def test_step_benchmarks_refuse_a_warmup_that_leaves_no_step_before_running(capsys):
    from benchmarks import chunked_vs_sync, vs_trl

    for benchmark in (chunked_vs_sync, vs_trl):
        with pytest.raises(SystemExit) as exit_info:
            benchmark.main(["--steps", "2", "--warmup", "2"])
        assert exit_info.value.code == 2
        assert "--warmup (2) must leave steps to time" in capsys.readouterr().err


def test_sparse_attention_check_only_without_gpu_is_refused_not_a_cpu_run(monkeypatch, capsys):
    from benchmarks import sparse_attention

    def cpu_decode(*args, **kwargs):
        raise AssertionError("ran (and would have written) the CPU benchmark")

    monkeypatch.setattr(sparse_attention, "cpu_decode", cpu_decode)
    with pytest.raises(SystemExit) as exit_info:
        sparse_attention.main(["--check-only"])
    assert exit_info.value.code == 2 and "use it with --gpu" in capsys.readouterr().err
