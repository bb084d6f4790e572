"""rlcpm.cpu_memory: a CPU worker process keeps freed memory and reuses it without page faults."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Allocate, touch and free a 96 MB tensor twice; report the page faults of the second round.
_PROBE = """
import json, resource, sys
import torch
from rlcpm.cpu_memory import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else None
def faults_of_one_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(24 * 1024 * 1024)  # 96 MB: above glibc's largest mmap threshold
    x.fill_(1.0)
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
first = faults_of_one_round()
print(json.dumps({"applied": applied, "first": first, "second": faults_of_one_round()}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_memory_is_reused_without_page_faults():
    plain, retained = _probe("plain"), _probe("retain")
    assert retained["applied"] is True
    # Without it every round maps fresh pages (faulted in again); with it the second round reuses
    # the first's. (Relative bounds: with transparent huge pages a fault maps 2 MB, not 4 KB.)
    assert plain["second"] >= 0.5 * plain["first"] > 0
    assert retained["second"] * 10 < min(plain["second"], retained["first"])


def test_recipe_default_is_on():
    from rlcpm.config import ClusterConfig

    assert ClusterConfig().retain_cpu_memory is True
    assert ClusterConfig(retain_cpu_memory=False).retain_cpu_memory is False
