"""Fixtures for reward tests: the user reward module on sys.path, sandbox process checks."""

from __future__ import annotations

from pathlib import Path

import pytest

USERLAND = Path(__file__).parent / "userland"


@pytest.fixture(scope="module")
def user_module():
    """Make tests/rewards/userland importable (as a user's PYTHONPATH would) and import the module."""
    import importlib

    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(USERLAND))
        yield importlib.import_module("rlcpm_user_rewards")


@pytest.fixture
def assert_no_survivors():
    """Call with SandboxRuns: asserts no process of their uid or session is left, workdirs removed."""
    from rlcpm.rewards.sandbox import processes_in_session, processes_of_uid

    def check(runs):
        for run in runs:
            assert run.uid is None or processes_of_uid(run.uid, include_zombies=True) == [], run
            assert processes_in_session(run.session_id) == [], run
            assert not Path(run.workdir).exists(), run.workdir

    return check
