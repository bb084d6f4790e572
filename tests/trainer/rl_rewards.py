"""Rewards for the RL-loop tests: they give a random tiny model's responses real variance."""


def first_token_even(sample) -> float:
    """1.0 when the response's first token id is even: a coin flip per response for a random model."""
    ids = sample.response_token_ids or [1]
    return 1.0 if ids[0] % 2 == 0 else 0.0


def first_token_multiple_of_4(sample) -> float:
    """1.0 with probability ~1/4 per response: about a third of the groups of 4 are all 0."""
    ids = sample.response_token_ids or [1]
    return 1.0 if ids[0] % 4 == 0 else 0.0


def first_token_multiple_of_8(sample) -> float:
    """1.0 with probability ~1/8 per response: most groups of 4 are all 0."""
    ids = sample.response_token_ids or [1]
    return 1.0 if ids[0] % 8 == 0 else 0.0


def always_zero(sample) -> float:
    """0.0 for every response: no group has a learning signal."""
    return 0.0
