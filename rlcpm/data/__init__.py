"""Datasets for rlcpm: local files or synthetic tasks in, rendered `Example`s out.

    from rlcpm.data import load_examples
    loaded = load_examples(recipe.data, "train", tokenizer, seed=recipe.seed, algorithm="grpo")
    loaded.examples[0].prompt, loaded.num_skipped

Formats: JSONL, JSON (a list or {"data": [...]}), Parquet, CSV, `datasets` save_to_disk
directories, and directories of such files. See docs/data.md.
"""

from rlcpm.data.example import Example, LoadedData
from rlcpm.data.loading import load_examples
from rlcpm.data.prompts import PromptRenderer
from rlcpm.data.readers import RawRow, read_rows
from rlcpm.data.synthetic import SYNTHETIC_TASKS, generate, write_jsonl

__all__ = [
    "SYNTHETIC_TASKS",
    "Example",
    "LoadedData",
    "PromptRenderer",
    "RawRow",
    "generate",
    "load_examples",
    "read_rows",
    "write_jsonl",
]
