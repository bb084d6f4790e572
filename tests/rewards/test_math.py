"""Math reward: answer extraction, equivalence verdicts (both ways), bounded time in any thread."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from rlcpm.errors import RewardError
from rlcpm.rewards import math as math_reward
from rlcpm.rewards.math import MathVerifier, choice_letter, extract_answer, last_boxed

# (response, gold answer): the response's final answer is mathematically the gold answer.
EQUIVALENT = [
    (r"So $x$ is \boxed{\frac{1}{2}}.", "0.5"),
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{\dfrac{3}{4}}", "0.75"),
    (r"\boxed{50\%}", "0.5"),
    (r"\boxed{25\%}", r"\frac{1}{4}"),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}"),
    (r"\boxed{2\pi}", r"\pi \cdot 2"),
    (r"\boxed{\sqrt{8}}", r"2\sqrt{2}"),
    (r"\boxed{\sqrt{3}/3}", r"\frac{1}{\sqrt{3}}"),
    (r"\boxed{[1, 2)}", "[1,2)"),
    (r"\boxed{(-\infty, 3]}", r"(-\infty,3]"),
    (r"\boxed{\{1, 2, 3\}}", r"\{3, 2, 1\}"),
    (r"\boxed{\left(1, 2\right)}", "(1,2)"),
    (r"\boxed{x = 3}", "3"),
    (r"The answer is $y=5$.", "5"),
    (r"\boxed{10 \text{ cm}}", "10"),
    (r"\boxed{\text{(B)}}", "B"),
    ("Therefore the answer is (C).", "C"),
    (r"\boxed{\text{B}}", r"\text{(B)}"),
    (r"\boxed{1,000}", "1000"),
    (r"\boxed{x^2+2x+1}", "(x+1)^2"),
    (r"\boxed{\frac{6}{8}}", r"\frac{3}{4}"),
    (r"\boxed{-\frac{1}{3}}", "-1/3"),
    ("Final answer: 42", "42"),
    ("Ann has 3 + 4 = 7 apples, so 7", "7"),
    (r"\boxed{3.0}", "3"),
    (r"\boxed{90^\circ}", "90"),
    (r"\boxed{2^{10}}", "1024"),
    (r"Reference: the answer is \boxed{12}", r"$\boxed{12}$"),
    (r"\fbox{9}", "9"),
    ("so x = \u22125", "-5"),  # a Unicode minus sign
    ("It costs .5 dollars.", "0.5"),
    ("The answer is: **12**", "12"),  # markdown bold
    ("The answer is **12** apples.", "12"),
    (r"\boxed{10\,000}", "10000"),  # a LaTeX thin space between digit groups
    (r"\boxed{\$1\,234\,567}", "1234567"),
    (r"\boxed{10~000}", r"10\ 000"),
]

# (response, gold answer): the response's final answer is a different value (or missing).
DIFFERENT = [
    (r"\boxed{\frac{1}{3}}", "0.5"),
    (r"\boxed{0.333}", r"\frac{1}{3}"),
    (r"\boxed{(1, 2)}", "[1,2]"),
    (r"\boxed{(2, 1)}", "(1,2)"),
    (r"\boxed{[1, 2]}", "[1,2)"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2, 3\}"),
    (r"\boxed{x = 4}", "3"),
    (r"\boxed{C}", "B"),
    (r"\boxed{2\sqrt{3}}", r"3\sqrt{2}"),
    (r"\boxed{\pi}", "3.14"),
    (r"\boxed{-2}", "2"),
    (r"\boxed{x^2+1}", "(x+1)^2"),
    ("I don't know.", "5"),
    (r"\boxed{}", "5"),
    (r"\boxed{1001}", "1000"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{4}"),
    ("The answer is (A).", "C"),
    (r"\boxed{(-\infty, 3)}", r"(-\infty, 3]"),
    (r"\boxed{25\%}", "0.5"),
    (r"\boxed{2^{10}}", "1000"),
    (r"First \boxed{7}, but wait, it is \boxed{8}", "7"),
    (r"\boxed{e}", "2.71"),
    ("so x = \u22125", "5"),  # the sign of a Unicode minus is not dropped
    ("It costs .5 dollars.", "5"),
    (r"\boxed{10\,000}", "0"),  # not the product 10 * 000
]


@pytest.fixture(scope="module")
def verifier():
    verifier = MathVerifier(num_workers=2)
    verifier.start()
    yield verifier
    verifier.close()


def test_at_least_forty_pairs_with_both_verdicts():
    assert len(EQUIVALENT) + len(DIFFERENT) >= 40 and len(EQUIVALENT) >= 20 and len(DIFFERENT) >= 20


def test_equivalence_verdicts_from_two_threads(verifier):
    """Every pair scored off the main thread (math-verify's own signal timeouts would refuse)."""
    cases = [(r, a, 1.0) for r, a in EQUIVALENT] + [(r, a, 0.0) for r, a in DIFFERENT]
    with ThreadPoolExecutor(max_workers=2) as pool:
        scores = list(pool.map(lambda c: math_reward.score(c[0], c[1], verifier=verifier), cases))
    wrong = [(r, a, want, got) for (r, a, want), got in zip(cases, scores) if got != want]
    assert wrong == []


@pytest.mark.parametrize(
    "response, expected",
    [
        (r"so \boxed{\frac{1}{2}} is it", r"\frac{1}{2}"),
        (r"\boxed{a} then \boxed{\sqrt{x^{2}}}", r"\sqrt{x^{2}}"),
        (r"The final answer is $\frac{3}{4}$.", r"\frac{3}{4}"),
        ("Answer: 17\nbecause ...", "17"),
        ("The answer is 42 apples. Then 7 more", "42 apples"),  # its sentence, not the whole line
        ("The answer is 3.5. Done", "3.5"),
        ("we get 3 then 12/5 in the end", "12/5"),
        ("no digits here", None),
        (r"cut off \boxed{\frac{1}{", None),
        (r"\boxed 7.", "7"),
        ("the temperature is now \u22123 degrees", "-3"),
        ("it weighs .25 kg, or 1.2.3", "3"),
        ("it weighs .25 kg", ".25"),
        ("The answer is **12**.", "12"),
        ("**Final Answer:** 12", "12"),
        ("The answer is **(B)**", "(B)"),
        ("Answer: 2**10", "2**10"),  # a power, not bold
    ],
)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_configured_pattern_replaces_the_defaults():
    response = r"#### 72 and \boxed{5}"
    assert extract_answer(response, pattern=r"####\s*(\S+)") == "72"
    assert extract_answer("nothing", pattern=r"####\s*(\S+)") is None
    assert math_reward.score(response, "72", pattern=r"####\s*(\S+)") == 1.0
    assert extract_answer("the total is 9", fallback_last_number=False) is None


def test_boxed_and_choice_helpers():
    assert last_boxed(r"\boxed{\frac{a}{b}} x") == r"\frac{a}{b}"
    assert last_boxed("no box") is None
    assert [choice_letter(t) for t in ["B", "(C)", r"\text{(D)} 12", "E.", "Apple", "12"]] == [
        "B",
        "C",
        "D",
        "E",
        None,
        None,
    ]


def test_missing_answer_is_an_error():
    with pytest.raises(RewardError, match="no answer"):
        math_reward.score(r"\boxed{1}", None)
    with pytest.raises(RewardError, match="list of acceptable answers is empty"):
        math_reward.score(r"\boxed{1}", [])


def test_a_list_of_gold_answers_accepts_any_of_them():
    gold = [r"\frac{1}{2}", "50\\%", "(B)"]
    assert math_reward.score(r"\boxed{0.5}", gold) == 1.0
    assert math_reward.score("The answer is (B)", gold) == 1.0
    assert math_reward.score(r"\boxed{0.25}", gold) == 0.0
    assert math_reward.score(r"\boxed{2}", ("1", 2)) == 1.0  # a tuple, and a number among strings


def test_slow_check_is_cut_at_the_time_limit_off_the_main_thread(verifier):
    """sympy would work on 10^(10^10) for minutes; the worker's own alarm stops it."""
    result = {}

    def check():
        start = time.monotonic()
        result["score"] = math_reward.score(r"\boxed{10^{10^{10}}}", "1", timeout_s=0.5, verifier=verifier)
        result["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=check)
    thread.start()
    thread.join(timeout=10)
    assert result["score"] == 0.0 and result["seconds"] < 2.0
    assert math_reward.score(r"\boxed{2}", "2.0", verifier=verifier) == 1.0  # the worker still serves


def test_unresponsive_worker_is_killed_and_replaced():
    """A worker that cannot run its signal handler (stopped, like one stuck in C code) is killed."""
    verifier = MathVerifier(num_workers=1)
    try:
        verifier.start()
        (pid,) = verifier.worker_pids()
        os.kill(pid, signal.SIGSTOP)
        start = time.monotonic()
        assert verifier.is_equivalent("1/2", "0.5", timeout_s=0.5) is False
        assert time.monotonic() - start < 1.5
        assert verifier.num_timeouts == 1
        assert not os.path.exists(f"/proc/{pid}")  # killed and reaped
        assert verifier.is_equivalent("1/2", "0.5", timeout_s=5.0) is True  # a fresh worker
        assert verifier.worker_pids() != [pid]
    finally:
        verifier.close()


@pytest.mark.parametrize(
    "response, gold, expected",
    [
        # a gold that starts with a capital letter is not a choice unless the letter stands alone
        # or is marked: the variable name alone must not earn the reward
        (r"\boxed{A = 13}", "A = 12", 0.0),
        (r"\boxed{F = 99 N}", "F = 10 N", 0.0),
        (r"\boxed{A \cap B}", r"A \cup B", 0.0),
        (r"\boxed{C}", r"C = 2\pi r", 0.0),
        (r"\boxed{12}", "A = 12", 1.0),
        # hedging between options picks none
        (r"\boxed{B \text{ or } C}", "B", 0.0),
        (r"\boxed{A B C D}", "A", 0.0),
        (r"\boxed{A) 3, B) 4}", "A", 0.0),
        (r"\boxed{(B) or C}", "B", 0.0),
        # real choices still score, with option text (articles included)
        (r"\boxed{(B) A triangle}", "(B) A triangle", 1.0),
        (r"\boxed{(B) 42}", "B", 1.0),
        ("The answer is (C).", "C", 1.0),
    ],
)
def test_capital_letter_answers_and_hedged_choices(response, gold, expected):
    assert math_reward.score(response, gold) == expected
