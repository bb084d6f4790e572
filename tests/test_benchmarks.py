"""The benchmark scripts measure what they say (small sizes; the full runs are not tests)."""

import argparse

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
