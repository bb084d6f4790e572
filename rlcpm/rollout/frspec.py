"""FR-Spec frequency ranking: which token ids the draft head keeps (SPECS §3.1).

    rlcpm freq data.jsonl --tokenizer MODEL_DIR --top-k 32768 -o vocab.frspec.json

    ranking = build_frequency_file("data.jsonl", "MODEL_DIR", top_k=32768, output="vocab.frspec.json")
    ranking = FrequencyRanking.load("vocab.frspec.json", tokenizer)   # refuses another tokenizer
    subset = ranking.subset_ids(keep=eos_ids)                        # top-k ids + always-kept ids

The corpus (the RL prompts and, as they accrue, responses) is tokenised, token ids are
counted and sorted by count (ties: smaller id first), and the top ``k`` are kept. EOS, the
tokenizer's special tokens (ChatML turn markers, padding) and any stop token ids given are
*always* in the subset, whatever their counts: the draft must be able to end a turn.

The file is JSON and records the tokenizer's identity — a SHA-256 over its token -> id map
(added tokens included) and its length — so a ranking is never applied to a tokenizer whose
ids mean other strings.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlcpm.errors import DataError, EngineError
from rlcpm.rollout.sampling import is_int

FORMAT = "rlcpm-frspec"
VERSION = 1
DEFAULT_FIELDS = ("prompt", "response")
_BATCH = 512


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of the tokenizer's full token -> id map (sorted by id), added tokens included."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()


@dataclass
class FrequencyRanking:
    """Token ids ranked by corpus frequency, for one tokenizer.

    token_ids: the top-k ids, most frequent first; counts: their counts. always_kept: ids in
    every subset regardless of counts (EOS, special tokens, stop tokens). num_tokens_counted:
    corpus size in tokens; coverage: fraction of those occurrences the top-k ids cover.
    """

    token_ids: list[int]
    counts: list[int]
    always_kept: list[int]
    tokenizer_sha256: str
    tokenizer_size: int
    top_k: int
    num_tokens_counted: int
    coverage: float
    sources: list[str] = field(default_factory=list)

    def subset_ids(self, keep: Iterable[int] = ()) -> list[int]:
        """The draft head's subset: the ranked ids, the always-kept ids and ``keep``; sorted."""
        return sorted(set(self.token_ids) | set(self.always_kept) | {int(t) for t in keep})

    def check_tokenizer(self, tokenizer: Any, source: str = "the frequency ranking") -> None:
        """Raise EngineError unless ``tokenizer`` is the one this ranking was counted with."""
        digest = tokenizer_fingerprint(tokenizer)
        if digest != self.tokenizer_sha256 or len(tokenizer) != self.tokenizer_size:
            raise EngineError(
                f"{source} was built for another tokenizer (sha256 {self.tokenizer_sha256[:12]}..., "
                f"{self.tokenizer_size} tokens), this one is sha256 {digest[:12]}... with {len(tokenizer)} "
                "tokens: rebuild it with `rlcpm freq DATASET --tokenizer MODEL_DIR -o FILE`"
            )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"format": FORMAT, "version": VERSION, **self.__dict__}
        path.write_text(json.dumps(record) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path, tokenizer: Any = None) -> FrequencyRanking:
        """Read a file written by ``save``; with ``tokenizer``, refuse a ranking built for another."""
        path = Path(path).expanduser()
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise EngineError(
                f"frequency ranking file {path} does not exist (make one with `rlcpm freq`)"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise EngineError(f"frequency ranking file {path} is not readable JSON: {err}") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise EngineError(f'{path} is not an FR-Spec frequency ranking (no "format": "{FORMAT}")')
        if record.get("version") != VERSION:
            raise EngineError(
                f"{path}: ranking format version {record.get('version')}, this rlcpm reads {VERSION}"
            )
        names = set(cls.__dataclass_fields__)
        missing = sorted(names - {"sources"} - set(record))
        if missing:
            raise EngineError(f"{path}: frequency ranking lacks {missing}")
        ranking = cls(**{k: v for k, v in record.items() if k in names})
        if not (
            _is_int_list(ranking.token_ids)
            and _is_int_list(ranking.always_kept)
            and is_int(ranking.tokenizer_size)
        ):
            raise EngineError(
                f"{path}: token_ids and always_kept must be lists of ints, tokenizer_size an int"
            )
        bad = [t for t in ranking.token_ids + ranking.always_kept if not 0 <= t < ranking.tokenizer_size]
        if bad:
            raise EngineError(
                f"{path}: token ids {bad[:5]} are outside the tokenizer's [0, {ranking.tokenizer_size})"
            )
        if tokenizer is not None:
            ranking.check_tokenizer(tokenizer, source=f"frequency ranking {path}")
        return ranking


def rank_tokens(
    counts: Counter,
    tokenizer: Any,
    top_k: int,
    keep_token_ids: Iterable[int] = (),
    sources: Sequence[str] = (),
) -> FrequencyRanking:
    """Sort counted ids (count desc, then id asc) and keep the top ``top_k``."""
    _check_top_k(top_k)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:top_k]
    total = sum(counts.values())
    kept = sum(count for _, count in ranked)
    always = set(int(t) for t in keep_token_ids) | set(getattr(tokenizer, "all_special_ids", []))
    if getattr(tokenizer, "eos_token_id", None) is not None:
        always.add(tokenizer.eos_token_id)
    return FrequencyRanking(
        token_ids=[token for token, _ in ranked],
        counts=[count for _, count in ranked],
        always_kept=sorted(always),
        tokenizer_sha256=tokenizer_fingerprint(tokenizer),
        tokenizer_size=len(tokenizer),
        top_k=top_k,
        num_tokens_counted=total,
        coverage=kept / total if total else 0.0,
        sources=list(sources),
    )


def count_tokens(texts: Iterable[str], tokenizer: Any) -> Counter:
    """Occurrences of every token id in ``texts`` (no special tokens added)."""
    counts: Counter = Counter()
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == _BATCH:
            _count_batch(batch, tokenizer, counts)
            batch = []
    if batch:
        _count_batch(batch, tokenizer, counts)
    return counts


def _count_batch(batch: list[str], tokenizer: Any, counts: Counter) -> None:
    for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
        counts.update(ids)


def dataset_texts(dataset: str | Path, fields: Sequence[str] = DEFAULT_FIELDS) -> Iterator[str]:
    """The text of the given columns of every row: strings as they are, chat message lists by
    their contents (also as JSON text, as CSV and Parquet string columns hold them). DataError
    names the file if no row holds any of the columns."""
    from rlcpm.data.readers import read_rows
    from rlcpm.data.rows import decode_conversation

    found = False
    columns_seen: set[str] = set()
    for row in read_rows(dataset):
        if row.parse_error is not None:
            raise DataError(f"{row.source} {row.location}: {row.parse_error}")
        if not isinstance(row.data, dict):
            raise DataError(f"{row.source} {row.location}: expected an object with named columns")
        columns_seen.update(row.data)
        for name in fields:
            value = decode_conversation(row.data.get(name))
            if isinstance(value, str):
                found = True
                yield value
            elif isinstance(value, list):
                for message in value:
                    if isinstance(message, dict) and isinstance(message.get("content"), str):
                        found = True
                        yield message["content"]
    if not found:
        raise DataError(
            f"{dataset}: no row has text in the column(s) {list(fields)}; columns present: "
            f"{sorted(columns_seen)} (choose them with --fields)"
        )


def eos_token_ids_of(model_dir: str | Path) -> set[int]:
    """EOS ids named by a model directory's generation_config.json and config.json (if present)."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                ids.update([eos] if isinstance(eos, int) else eos)
    return ids


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(is_int(t) for t in value)


def _check_top_k(top_k: Any) -> None:
    if not is_int(top_k) or top_k <= 0:
        raise EngineError(f"top_k must be an int > 0, got {top_k!r}")


def build_frequency_file(
    dataset: str | Path,
    tokenizer: str | Path | Any,
    top_k: int = 32768,
    output: str | Path = "frspec_vocab.json",
    fields: Sequence[str] | None = None,
    keep_token_ids: Iterable[int] = (),
) -> FrequencyRanking:
    """Count the tokens of ``dataset``'s text columns and write the top-``top_k`` ranking to ``output``.

    dataset: a JSONL/JSON/Parquet/CSV file, a directory of them, or a ``datasets`` directory.
    tokenizer: a tokenizer or a directory (a model directory also contributes the EOS ids of
    its generation_config.json / config.json). fields: columns to count (default prompt,
    response). keep_token_ids: stop tokens to keep whatever their counts.
    """
    _check_top_k(top_k)  # before the long count
    keep = set(keep_token_ids)
    if isinstance(tokenizer, str | Path):
        from rlcpm.models import load_tokenizer

        keep |= eos_token_ids_of(tokenizer)
        tokenizer = load_tokenizer(tokenizer)
    counts = count_tokens(dataset_texts(dataset, tuple(fields or DEFAULT_FIELDS)), tokenizer)
    ranking = rank_tokens(counts, tokenizer, top_k, keep, sources=[str(dataset)])
    ranking.save(output)
    return ranking
