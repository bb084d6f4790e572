"""FR-Spec frequency ranking (`rlcpm freq`) and the subset draft head."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from rlcpm.errors import DataError, EngineError
from rlcpm.rollout.draft_head import DraftHead
from rlcpm.rollout.frspec import FrequencyRanking, build_frequency_file, tokenizer_fingerprint

ROWS = [
    {"prompt": "What is 12 + 7?", "response": "12 + 7 = 19. The answer is 19.", "answer": "19"},
    {"prompt": "What is 3 * 4?", "response": "3 * 4 = 12.", "answer": "12"},
    {
        "messages": [{"role": "user", "content": "Say hello to the user please"}],
        "response": "hello hello hello",
    },
]


@pytest.fixture(scope="module")
def tokenizer(tiny_dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_dirs["llama"]))


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def _hand_count(tokenizer, texts) -> Counter:
    counts: Counter = Counter()
    for text in texts:
        counts.update(tokenizer.encode(text, add_special_tokens=False))
    return counts


def test_frequency_file_ranks_counts_and_round_trips(tiny_dirs, tokenizer, corpus, tmp_path):
    output = tmp_path / "vocab.json"
    ranking = build_frequency_file(corpus, tiny_dirs["llama"], top_k=6, output=output)
    counts = _hand_count(tokenizer, [r.get("prompt", "") for r in ROWS] + [r["response"] for r in ROWS])
    expected = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:6]
    assert list(zip(ranking.token_ids, ranking.counts)) == expected
    assert ranking.num_tokens_counted == sum(counts.values())
    assert ranking.coverage == pytest.approx(sum(c for _, c in expected) / sum(counts.values()))
    # EOS ids (tokenizer, generation_config) and every special token are always kept
    generation_eos = json.loads((tiny_dirs["llama"] / "generation_config.json").read_text())["eos_token_id"]
    assert set(generation_eos) | set(tokenizer.all_special_ids) <= set(ranking.always_kept)
    subset = ranking.subset_ids(keep=[500])
    assert subset == sorted(set(ranking.token_ids) | set(ranking.always_kept) | {500})

    loaded = FrequencyRanking.load(output, tokenizer)
    assert loaded == ranking


def test_chat_message_fields_are_counted(tokenizer, corpus, tmp_path):
    ranking = build_frequency_file(
        corpus, tokenizer, top_k=1000, output=tmp_path / "v.json", fields=["messages"]
    )
    counts = _hand_count(tokenizer, ["Say hello to the user please"])
    assert dict(zip(ranking.token_ids, ranking.counts)) == dict(counts)


def test_conversations_stored_as_json_text_are_counted_by_their_contents(tokenizer, tmp_path):
    """A CSV / Parquet string cell holding a conversation counts its messages' text, as the data
    loader reads it, not the JSON syntax around it."""
    import csv

    turns = [{"role": "user", "content": "Say hello"}, {"role": "assistant", "content": "hello there"}]
    path = tmp_path / "chat.csv"
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([["messages"], [json.dumps(turns)]])
    ranking = build_frequency_file(
        path, tokenizer, top_k=1000, output=tmp_path / "v.json", fields=["messages"]
    )
    counts = _hand_count(tokenizer, ["Say hello", "hello there"])
    assert dict(zip(ranking.token_ids, ranking.counts)) == dict(counts)


def test_a_ranking_for_another_tokenizer_is_refused(tiny_dirs, tokenizer, corpus, tmp_path):
    from rlcpm.models.tiny import build_tokenizer

    output = tmp_path / "vocab.json"
    build_frequency_file(corpus, tokenizer, top_k=50, output=output)
    other = build_tokenizer(512, extra_words=["zebra", "quokka"])
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer)
    with pytest.raises(EngineError, match="another tokenizer"):
        FrequencyRanking.load(output, other)
    with pytest.raises(EngineError, match="another tokenizer"):
        from rlcpm.rollout.speculative import Drafter

        Drafter.from_pretrained(tiny_dirs["llama"], 2, output, tokenizer=other)


def test_bad_inputs_name_the_file(tokenizer, corpus, tmp_path):
    with pytest.raises(DataError, match="no row has text in the column"):
        build_frequency_file(corpus, tokenizer, output=tmp_path / "v.json", fields=["nothing"])
    with pytest.raises(EngineError, match="does not exist"):
        FrequencyRanking.load(tmp_path / "missing.json")
    not_a_ranking = tmp_path / "other.json"
    not_a_ranking.write_text('{"format": "something"}')
    with pytest.raises(EngineError, match="not an FR-Spec frequency ranking"):
        FrequencyRanking.load(not_a_ranking)
    with pytest.raises(EngineError, match="top_k must be an int > 0, got 0"):  # before counting
        build_frequency_file(tmp_path / "no-such-corpus.jsonl", tokenizer, top_k=0)


def test_a_hand_edited_ranking_with_non_integer_ids_names_the_file(tokenizer, corpus, tmp_path):
    path = tmp_path / "v.json"
    build_frequency_file(corpus, tokenizer, top_k=8, output=path)
    record = json.loads(path.read_text())
    record["token_ids"][0] = "12"
    path.write_text(json.dumps(record))
    with pytest.raises(EngineError, match="v.json: token_ids and always_kept must be lists of ints"):
        FrequencyRanking.load(path)


def test_rlcpm_freq_cli_writes_the_file(tiny_dirs, tokenizer, corpus, tmp_path, capsys):
    from rlcpm.cli import main

    output = tmp_path / "cli_vocab.json"
    argv = [
        "freq", str(corpus), "--tokenizer", str(tiny_dirs["llama"]), "--top-k", "4", "-o", str(output),
    ]  # fmt: skip
    assert main(argv) == 0
    ranking = FrequencyRanking.load(output, tokenizer)
    assert len(ranking.token_ids) == 4 and ranking.top_k == 4
    assert f"the top 4 ids cover {ranking.coverage:.1%} of the" in capsys.readouterr().out
    assert (
        main(["freq", str(tmp_path / "nope.jsonl"), "--tokenizer", str(tiny_dirs["llama"]), "-o", "x"]) == 1
    )


def test_subset_logits_equal_full_logits_gathered():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 16, generator=generator, dtype=torch.float64)
    hidden = torch.randn(3, 4, 16, generator=generator, dtype=torch.float64)
    head = DraftHead(weight, [41, 7, 0, 19, 3])
    assert head.subset_ids.tolist() == [0, 3, 7, 19, 41]
    full = hidden @ weight.T  # [3, 4, 50]
    torch.testing.assert_close(head(hidden), full[..., head.subset_ids], rtol=0, atol=1e-12)
    weight32, hidden32 = weight.float(), hidden.float()
    torch.testing.assert_close(
        DraftHead(weight32, [41, 7, 0])(hidden32),
        (hidden32 @ weight32.T)[..., [0, 7, 41]],
        rtol=1e-6,
        atol=1e-5,
    )
    rows = torch.tensor([[4, 0], [2, 1]])
    assert head.to_full_ids(rows).tolist() == [[41, 0], [7, 3]]
    assert head.to_subset_index(torch.tensor([41, 5, 3])).tolist() == [4, -1, 1]
    assert head.flops_per_token == 2 * 16 * 5
    assert DraftHead(weight).is_full_vocabulary and DraftHead(weight).num_tokens == 50
    for bad, message in (([], "empty"), ([3, 50], "outside"), ([4, 4], "duplicate")):
        with pytest.raises(EngineError, match=message):
            DraftHead(weight, bad)
