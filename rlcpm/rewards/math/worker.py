"""A math-verify worker process: one JSON request per stdin line, one JSON reply per stdout line.

Request {"gold": str, "pred": str, "timeout_s": float} -> reply {"equal": bool, "error": str|null}.
Runs as its own process so that signal-based time limits work (this is its main thread) and so
the parent can kill it when sympy is stuck inside C code where no signal reaches.
Started by `verifier.MathVerifier` as `python worker.py`; prints "ready" once imports are done.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys


class CheckTimeout(BaseException):
    """BaseException so that math-verify's `except Exception` handlers let it through."""


def _on_alarm(signum, frame):
    raise CheckTimeout()


def main() -> int:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    config = [LatexExtractionConfig(), ExprExtractionConfig()]

    @functools.lru_cache(maxsize=4096)
    def parse_answer(text: str):
        return parse(f"${text}$", config, parsing_timeout=None)

    def check(gold: str, pred: str) -> bool:
        return bool(verify(parse_answer(gold), parse_answer(pred), timeout_seconds=None))

    signal.signal(signal.SIGALRM, _on_alarm)
    parse_answer("1")  # warm up the parser before accepting work
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        reply = {"equal": False, "error": None}
        try:
            signal.setitimer(signal.ITIMER_REAL, float(request["timeout_s"]))
            try:
                reply["equal"] = check(request["gold"], request["pred"])
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except CheckTimeout:
            reply["error"] = "timed out"
        except Exception as err:  # noqa: BLE001 - a malformed answer is a wrong answer
            reply["error"] = f"{type(err).__name__}: {err}"[:300]
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
