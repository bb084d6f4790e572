"""rlcpm.cpu_memory: a CPU worker process keeps freed memory and reuses it without page faults."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Allocate, touch and free a 96 MB tensor (above glibc's largest mmap threshold) round after
# round, as a training loop does with its activations; report each round's page faults.
_PROBE = """
import json, resource, sys
import torch
from rlcpm.cpu_memory import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else None
def faults_of_one_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(24 * 1024 * 1024)
    x.fill_(1.0)
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "rounds": [faults_of_one_round() for _ in range(8)]}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_memory_is_reused_without_page_faults():
    plain, retained = _probe("plain"), _probe("retain")
    assert retained["applied"] is True
    first = plain["rounds"][0]
    # Without it every round maps fresh pages and faults them in again. With it the heap grows
    # for the first few rounds (a freed block next to a small live one is a little too small for
    # the next aligned request) and then serves every round from pages it holds. (Relative
    # bounds: with transparent huge pages a fault maps 2 MB, not 4 KB.)
    assert first > 0 and min(plain["rounds"]) >= 0.5 * first
    assert max(retained["rounds"][-3:]) * 10 < first


def test_recipe_default_is_on():
    from rlcpm.config import ClusterConfig

    assert ClusterConfig().retain_cpu_memory is True
    assert ClusterConfig(retain_cpu_memory=False).retain_cpu_memory is False
