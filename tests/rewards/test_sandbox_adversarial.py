"""The adversarial suite: hostile programs run through `code.score`, each asserted contained.

Every case is a program a policy might emit; the tests would pass for an honest `solve`
(`solve(2) == 4`). Each must score 0, stay inside its limits, and leave nothing behind: no
process of its uid or session, no working directory, no file outside the sandbox, no connection.
"""

from __future__ import annotations

import ast
import os
import secrets
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rlcpm.rewards import code
from rlcpm.rewards.sandbox import detect_isolation

TESTS = ["assert solve(2) == 4", "assert solve(3) > 5"]
HONEST = "def solve(x):\n    return 2 * x\n"
TIMEOUT_S = 1.0
MARKER = f"rlcpm-escape-{secrets.token_hex(4)}"
REPO = Path(__file__).resolve().parents[2]
ESCAPE_PATHS = [
    f"/tmp/{MARKER}",
    f"/var/tmp/{MARKER}",
    f"/dev/shm/{MARKER}",
    f"{REPO}/{MARKER}",
    f"/root/{MARKER}",
    f"/{MARKER}",
]
SECRET = f"sk-test-{secrets.token_hex(8)}"


@pytest.fixture(scope="module")
def listener():
    """A TCP server on 127.0.0.1 recording every connection it accepts."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    accepted, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            accepted.append(conn.recv(100))
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    server.close()


def hostile_programs(port: int) -> dict[str, str]:
    paths = repr(ESCAPE_PATHS)
    return {
        "infinite loop": "while True:\n    pass\n" + HONEST,
        "infinite loop in the function": "def solve(x):\n    while True:\n        pass\n",
        "sleep past the timeout": "import time\ntime.sleep(60)\n" + HONEST,
        "sleep ignoring the alarm": "import signal, time\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\ntime.sleep(60)\n"
        + HONEST,
        "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        "memory bomb": "blocks = []\nwhile True:\n    blocks.append(bytes(1 << 28))\n",
        "huge allocation": "x = bytearray(64 << 30)\n" + HONEST,
        "write outside the temp dir": (
            f"import os\nfor p in {paths}:\n    try:\n        open(p, 'w').write('x')\n        print('wrote', p)\n"
            "    except OSError as e:\n        print('refused', p, e)\n"
            "def solve(x):\n    return 0\n"
        ),
        "read environment secrets": (
            "import os\nfound = str(dict(os.environ))\nfor p in ('/proc/self/environ', '/proc/1/environ', f'/proc/{os.getppid()}/environ'):\n"
            "    try:\n        found += open(p, 'rb').read().decode(errors='replace')\n    except OSError:\n        pass\n"
            "print(found)\ndef solve(x):\n    return 4 if 'RLCPM_TEST_SECRET' in found else 0\n"
        ),
        "network connection to 127.0.0.1": (
            f"import socket\ndef solve(x):\n    s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "    s.sendall(b'escaped')\n    return 4\n"
        ),
        "os._exit(0) before the tests": HONEST.replace("return 2 * x", "return 0")
        + "import os\nos._exit(0)\n",
        "prints fake success and forges reports": (
            "import json, os\nprint('PASSED'); print('All tests passed!'); print('OK')\n"
            "fake = json.dumps({'token': '0' * 32, 'unit': 0, 'step': 0, 'ok': True, 'value': '4', 'error': None})\n"
            "for fd in map(int, os.listdir('/proc/self/fd')):\n    try:\n        if fd > 2:\n            os.write(fd, (fake + '\\n').encode())\n    except OSError:\n        pass\n"
            "os._exit(0)\n"
        ),
        "patches sys.exit and assertions": (
            "import sys, builtins, atexit\nsys.exit = lambda *a: None\nbuiltins.exit = builtins.quit = sys.exit\n"
            "builtins.AssertionError = type('Ignored', (Exception,), {})\nsys.excepthook = lambda *a: None\n"
            "atexit.register(lambda: print('PASSED'))\ndef solve(x):\n    raise SystemExit(0)\n"
        ),
        "kills its parent": (
            "import os, signal\nfor target in (os.getppid(), 1, -1, 0):\n    try:\n        os.kill(target, signal.SIGKILL)\n"
            "    except OSError:\n        pass\ndef solve(x):\n    return 0\n"
        ),
        "child outlives the timeout": (
            "import os, subprocess, time\nsubprocess.Popen(['sleep', '300'], start_new_session=True)\n"
            "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(300)\n    os._exit(0)\n"
            "time.sleep(60)\n"
        ),
        "1 GB stdout flood": "import os\nfor _ in range(1 << 14):\n    os.write(1, b'x' * (1 << 16))\n"
        + HONEST,
    }


@pytest.fixture(scope="module")
def suite(listener):
    """Run every hostile program at once (4 at a time) through code.run_tests."""
    port, _ = listener
    os.environ["RLCPM_TEST_SECRET"] = SECRET  # a secret in the scoring process's environment
    canary = subprocess.Popen(["sleep", "120"])  # a process of ours the programs must not reach
    try:
        programs = hostile_programs(port)

        def run(item):
            start = time.monotonic()
            result = code.run_tests(f"```python\n{item[1]}```", TESTS, timeout_s=TIMEOUT_S)
            return item[0], result, time.monotonic() - start

        with ThreadPoolExecutor(max_workers=4) as pool:
            outcomes = {name: (result, seconds) for name, result, seconds in pool.map(run, programs.items())}
        canary_alive = canary.poll() is None
    finally:
        os.environ.pop("RLCPM_TEST_SECRET", None)
        canary.kill()
        canary.wait()
    return outcomes, canary_alive


def test_namespaces_are_used_here():
    assert detect_isolation().level == "namespaces"  # we run as root with unshare (the full sandbox)


def test_every_hostile_program_scores_zero(suite):
    outcomes, _ = suite
    assert {name: result.fraction for name, (result, _) in outcomes.items()} == {
        name: 0.0 for name in outcomes
    }


def test_every_run_ended_within_its_time_budget(suite):
    outcomes, _ = suite
    budget = TIMEOUT_S * (len(TESTS) + 1)  # load + one per test unit
    slow = {name: seconds for name, (_, seconds) in outcomes.items() if seconds > budget + 8}
    assert slow == {}


def test_no_process_survives_and_workdirs_are_gone(suite, assert_no_survivors):
    outcomes, _ = suite
    runs = [run for result, _ in outcomes.values() for run in result.runs]
    assert_no_survivors(runs)
    assert len({run.uid for run in runs}) == len(runs)  # each run had its own uid


def test_resource_limits_contained_the_bombs(suite):
    outcomes, _ = suite
    for name in ("infinite loop", "sleep past the timeout", "infinite loop in the function", "fork bomb"):
        assert "timed out" in outcomes[name][0].outcomes[0].reason, name
    assert outcomes["sleep ignoring the alarm"][0].runs[0].timed_out  # killed by the supervisor
    for name in ("memory bomb", "huge allocation"):
        assert "MemoryError" in outcomes[name][0].outcomes[0].reason, name
    flood = outcomes["1 GB stdout flood"][0].runs[0]
    assert flood.output_limit_exceeded and len(flood.stdout) <= code.SandboxLimits().max_output_bytes
    assert flood.wall_s < 5


def test_nothing_written_outside_the_sandbox(suite):
    outcomes, _ = suite
    assert [p for p in ESCAPE_PATHS if os.path.exists(p)] == []
    stdout = outcomes["write outside the temp dir"][0].runs[0].stdout.decode()
    assert f"wrote /tmp/{MARKER}" in stdout  # its private /tmp took the write, and vanished with it
    assert f"refused {REPO}/{MARKER}" in stdout and f"refused /root/{MARKER}" in stdout


def test_secrets_do_not_leak(suite):
    outcomes, _ = suite
    run = outcomes["read environment secrets"][0].runs[0]
    assert SECRET not in (run.stdout + run.stderr).decode(errors="replace")
    assert "RLCPM_TEST_SECRET" not in run.stdout.decode(errors="replace")


def test_no_network_connection(suite, listener):
    outcomes, _ = suite
    _, accepted = listener
    assert accepted == []
    assert "unreachable" in outcomes["network connection to 127.0.0.1"][0].outcomes[0].reason.lower()


def test_faking_success_is_detected(suite):
    outcomes, _ = suite
    assert outcomes["prints fake success and forges reports"][0].runs[0].tampered
    assert "exited" in outcomes["os._exit(0) before the tests"][0].outcomes[0].reason


def test_parent_and_neighbours_unharmed(suite):
    _, canary_alive = suite
    assert canary_alive
    assert code.score(f"```python\n{HONEST}```", TESTS) == 1.0  # the machine still runs sandboxes


def test_memory_of_all_processes_together_is_capped(assert_no_survivors):
    """Eight children touching 300 MB each stay under the run's 512 MB cgroup: some are OOM-killed."""
    from rlcpm.rewards.sandbox import SandboxLimits, run_sandboxed
    from rlcpm.rewards.sandbox.cgroups import cgroup_parents

    assert any(p.limit_file.startswith("memory") for p in cgroup_parents())  # root here: cgroups writable
    program = (
        "import os\nkids = []\nfor _ in range(8):\n    pid = os.fork()\n    if pid == 0:\n"
        "        block = bytearray(300 << 20)\n        os._exit(0)\n    kids.append(pid)\n"
        "print([os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in kids])\n"
    )
    run = run_sandboxed(program, limits=SandboxLimits(timeout_s=10, memory_mb=512, total_memory_mb=512))
    statuses = ast.literal_eval(run.stdout.decode())
    assert len(statuses) == 8 and -9 in statuses, statuses
    assert_no_survivors([run])
