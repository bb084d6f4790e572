"""Speculative decoding on this CPU: plain vs a full-vocabulary draft head vs FR-Spec heads.

    python -m benchmarks.speculative                       # trains once (cached), then measures
    python -m benchmarks.speculative --batches 1 --repeats 3 --new-tokens 96

The pair: a target (6 layers, hidden 256) and a much smaller draft (1 layer, hidden 128), both SFT-trained by rlcpm (``train_offline`` with an SFT recipe, bf16-mixed)
on the same synthetic mixture (arithmetic word problems, Python functions, JSON tool calls),
with an 8,192-token byte-level BPE trained on the task corpus plus rare random "words" the task
never uses. The embedding and LM head are padded to 32,768 rows of reserved ids that are never
predicted, so the full draft head dominates the draft, as with real 128k vocabularies. The
FR-Spec subsets (``FRSPEC_SUBSETS``) are the top 8,192, 256 and 64 ids of ``rlcpm freq`` over the
training data plus general text (the rare words, as FR-Spec counts a general corpus), so the
task's frequent tokens rank first. The first holds every id the corpus has and drops only the
padding rows. The others cut into the 411 ids the task uses, trading acceptance for a cheaper
head; their coverage of the held-out outputs is reported. Trained checkpoints are cached under
``--cache-dir``.

Measured side by side in one run, on held-out prompts of the same mixture, greedy (EOS
ignored; all systems must emit identical tokens, checked) and sampled (T = 1): decode
throughput (new tokens / generate wall time, best of ``--repeats``, systems interleaved),
process-CPU-time throughput (robust to a shared machine with one thread), acceptance length
(tokens per target verification), and drafting cost (draft seconds per drafted token) with
the draft LM head's FLOPs. Writes benchmarks/results/speculative.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import string
import time
from pathlib import Path

from benchmarks.common import machine_info, write_result

TOKENIZER_SIZE = 8192  # BPE tokens, trained on the task corpus + rare words
VOCAB_SIZE = 32768  # embedding / LM-head rows after padding (reserved ids never predicted)
FRSPEC_TOP_K = 8192  # the ranking's length (the subset of the first FR-Spec system)
# FR-Spec subsets measured: every id the tokenizer emits in the task (the task uses 411 of the
# 8,192), then subsets that cover ~96% and ~72% of the task's tokens (FR-Spec's regime: the
# paper keeps 25% of a 128k vocabulary, covering ~95% of occurrences).
FRSPEC_SUBSETS = (FRSPEC_TOP_K, 256, 64)
TARGET = dict(
    hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2
)
DRAFT = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
)
NUM_TRAIN = 2400
NUM_RARE_WORDS = 60_000
TARGET_SFT = dict(epochs=2, samples_per_step=32, max_seq_len=384)
DRAFT_SFT = dict(epochs=3, samples_per_step=32, max_seq_len=384)  # a 1-layer draft trains in minutes


# ------------------------------------------------------------------------------------- data


def task_rows(num: int, seed: int) -> list[dict]:
    """A seeded mixture: 45% arithmetic word problems (2-4 steps), 30% Python functions, 25%
    JSON tool calls (rlcpm.data.synthetic), shuffled."""
    from rlcpm.data.synthetic import generate

    num_math, num_code = num * 9 // 20, num * 3 // 10
    shares = (
        ("arithmetic", num_math, dict(num_steps=[2, 4], digits=[1, 2])),
        ("code", num_code, {}),
        ("tool_use", num - num_math - num_code, {}),
    )
    rows = [row for task, n, options in shares if n for row in generate(task, n, seed=seed, **options)]
    rows = [{"prompt": r["prompt"], "response": r["response"]} for r in rows]
    random.Random(seed).shuffle(rows)
    return rows


def rare_words(num: int = NUM_RARE_WORDS) -> list[str]:
    """Random lowercase 'words': they give the BPE the rare merges of a general vocabulary."""
    rng = random.Random(1234)
    return ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 9))) for _ in range(num)]


def build_tokenizer(rows: list[dict], path: Path):
    from rlcpm.models.tiny import save_tokenizer, train_bpe_tokenizer

    corpus = [r["prompt"] + "\n" + r["response"] for r in rows] + rare_words()
    tokenizer = train_bpe_tokenizer(corpus, TOKENIZER_SIZE)
    save_tokenizer(tokenizer, path)
    return tokenizer


# --------------------------------------------------------------------------------- training


def train_sft(name: str, arch: dict, sft: dict, tokenizer, data_file: Path, cache: Path, seed: int) -> Path:
    """rlcpm SFT of a fresh tiny model on data_file; returns the final HF directory (cached)."""
    name = f"{name}-{_key(arch, sft, seed)}"
    from rlcpm.config import load_recipe
    from rlcpm.models.tiny import build_tiny_model_dir
    from rlcpm.trainer.offline import train_offline

    run_dir = cache / f"{name}-run"
    final = run_dir / "final"
    if (final / "config.json").is_file():
        return final
    init_dir = cache / f"{name}-init"
    build_tiny_model_dir(
        init_dir,
        "llama",
        tokenizer=tokenizer,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        seed=seed,
        **arch,
    )
    recipe = load_recipe(
        data={
            "seed": seed,
            "run_dir": str(run_dir),
            "model": {"path": str(init_dir), "dtype": "float32", "device": "cpu"},
            "data": {"train": str(data_file), "apply_chat_template": False},
            "algorithm": {"name": "sft", **sft},
            "learner": {
                "lr": 3e-3,
                "precision": "float32",
                "schedule": {
                    "name": "wsd",
                    "warmup_steps": 10,
                    "decay_fraction": 0.2,
                    "decay_form": "linear",
                },
                "checkpoint": {"every_steps": 10_000, "keep_last": 1},
            },
            "logging": {"wandb": {"mode": "disabled"}, "progress": False},
        }
    )
    start = time.perf_counter()
    train_offline(recipe)
    print(f"trained {name} in {time.perf_counter() - start:.0f} s", flush=True)
    return final


def pad_vocabulary(model_dir: Path, output: Path, vocab_size: int, reserved_like: int) -> Path:
    """Pad the embedding and LM head to ``vocab_size`` rows (a copy of the model in ``output``).

    Training ran over the tokenizer's ids only (the LM head over 32k rows would dominate the
    cost of training on this CPU); the reserved ids past them are copies of the trained rows of
    ``reserved_like`` (the padding token, never a training target, so its logit is pushed far
    below the others): they are never predicted, as the unused rows of a padded checkpoint.
    """
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    if (output / "config.json").is_file():
        return output
    shutil.copytree(model_dir, output, dirs_exist_ok=True)
    tensors = load_file(str(model_dir / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in tensors:
            weight = tensors[name]
            extra = weight[reserved_like].expand(vocab_size - weight.shape[0], -1)
            tensors[name] = torch.cat([weight, extra]).contiguous()
    save_file(tensors, str(output / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((output / "config.json").read_text())
    config["vocab_size"] = vocab_size
    (output / "config.json").write_text(json.dumps(config, indent=2))
    return output


def prepare(cache: Path) -> dict:
    """Data, tokenizer, both SFT checkpoints and the FR-Spec ranking (each made once)."""
    from transformers import AutoTokenizer

    from rlcpm.data.synthetic import write_jsonl
    from rlcpm.rollout.frspec import FrequencyRanking, build_frequency_file

    cache.mkdir(parents=True, exist_ok=True)
    data_file = cache / "train.jsonl"
    if not data_file.is_file():
        write_jsonl(task_rows(NUM_TRAIN, seed=0), data_file)
    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    tokenizer_dir = cache / "tokenizer"
    if (tokenizer_dir / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    else:
        tokenizer = build_tokenizer(rows, tokenizer_dir)
    models = {}
    for name, arch, sft, seed in (("target", TARGET, TARGET_SFT, 1), ("draft", DRAFT, DRAFT_SFT, 2)):
        trained = train_sft(name, arch, sft, tokenizer, data_file, cache, seed)
        models[name] = pad_vocabulary(trained, trained.parent / "padded", VOCAB_SIZE, tokenizer.pad_token_id)
    target, draft = models["target"], models["draft"]
    vocab_files, rankings = {}, {}
    for top_k in FRSPEC_SUBSETS:
        vocab_files[top_k] = cache / (
            "frspec_vocab_general.json" if top_k == FRSPEC_TOP_K else f"frspec_vocab_top{top_k}.json"
        )
        if vocab_files[top_k].is_file():
            rankings[top_k] = FrequencyRanking.load(vocab_files[top_k], tokenizer)
        else:
            corpus = frequency_corpus(cache, rows)
            rankings[top_k] = build_frequency_file(corpus, target, top_k=top_k, output=vocab_files[top_k])
    return {
        "target": target,
        "draft": draft,
        "vocab_files": vocab_files,
        "rankings": rankings,
        "tokenizer": tokenizer,
    }


def frequency_corpus(cache: Path, rows: list[dict]) -> Path:
    """What the ranking counts: the task data plus general text (the rare words, standing in for
    the pre-training corpus FR-Spec counts), so the ranking covers the vocabulary and the top
    ``FRSPEC_TOP_K`` ids are a real quarter of it, frequent task tokens first."""
    from rlcpm.data.synthetic import write_jsonl

    path = cache / "frequency_corpus.jsonl"
    if not path.is_file():
        words = rare_words()
        general = [
            {"prompt": "", "response": " ".join(words[i : i + 100])} for i in range(0, len(words), 100)
        ]
        write_jsonl(rows + general, path)
    return path


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]


# ---------------------------------------------------------------------------------- measure


def make_engines(assets: dict, num_draft_tokens: int, max_num_seqs: int) -> dict:
    """plain, speculative with the full-vocabulary draft head, and one speculative engine per
    FR-Spec subset ("spec-frspec-<top_k>")."""
    from rlcpm.rollout import Engine

    common = dict(dtype="float32", max_num_seqs=max_num_seqs, kv_budget_gb=0.25)
    spec = {"draft": str(assets["draft"]), "num_draft_tokens": num_draft_tokens}
    engines = {
        "plain": Engine.from_pretrained(str(assets["target"]), **common),
        "spec-full-head": Engine.from_pretrained(str(assets["target"]), speculative=spec, **common),
    }
    for top_k, vocab_file in assets["vocab_files"].items():
        engines[f"spec-frspec-{top_k}"] = Engine.from_pretrained(
            str(assets["target"]), speculative={**spec, "frspec_vocab": str(vocab_file)}, **common
        )
    return engines


def run_once(engine, prompts: list[list[int]], params, batch: int) -> dict:
    """Generate for every prompt, `batch` prompts per call; wall and process CPU seconds."""
    before = engine.engine_stats()
    wall, cpu = time.perf_counter(), time.process_time()
    outs = []
    for i in range(0, len(prompts), batch):
        outs += engine.generate(prompts[i : i + batch], params)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    after = engine.engine_stats()
    delta = {
        k: after[k] - before[k] for k in after if k.startswith("spec_") and isinstance(after[k], int | float)
    }
    return {"wall_s": wall, "cpu_s": cpu, "tokens": [o.token_ids for o in outs], "spec": delta}


def summarize(runs: list[dict], head_flops: int | None) -> dict:
    num_tokens = sum(len(t) for t in runs[0]["tokens"])
    best_wall = min(r["wall_s"] for r in runs)
    best_cpu = min(r["cpu_s"] for r in runs)
    row = {
        "new_tokens": num_tokens,
        "tokens_per_s": num_tokens / best_wall,
        "tokens_per_cpu_s": num_tokens / best_cpu,
    }
    spec = runs[0]["spec"]
    if spec.get("spec_num_rounds"):
        drafted = spec["spec_draft_tokens"]
        row.update(
            acceptance_len=1 + spec["spec_accepted_tokens"] / spec["spec_num_rounds"],
            acceptance_rate=spec["spec_accepted_tokens"] / drafted,
            draft_ms_per_token=min(r["spec"]["spec_draft_seconds"] / drafted for r in runs) * 1e3,
            verify_ms_per_round=min(r["spec"]["spec_verify_seconds"] / spec["spec_num_rounds"] for r in runs)
            * 1e3,
            draft_head_mflops_per_token=head_flops / 1e6,
        )
    return row


def measure(assets: dict, args) -> dict:
    import torch

    from rlcpm.rollout import SamplingParams

    tokenizer = assets["tokenizer"]
    rows = task_rows(args.prompts, seed=7)  # held out: another seed than the training data
    prompts = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    modes = {
        "greedy": SamplingParams(max_new_tokens=args.new_tokens, temperature=0),
        "sampled T=1": SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=0),
    }
    results = []
    for batch in args.batches:
        engines = make_engines(assets, args.k, max_num_seqs=batch)
        heads = {name: e.speculator.drafter.head for name, e in engines.items() if e.speculator is not None}
        for mode, params in modes.items():
            for engine in engines.values():  # warm-up (one-time packing, allocator)
                run_once(engine, prompts[:2], params, batch)
            runs: dict[str, list[dict]] = {name: [] for name in engines}
            for _ in range(args.repeats):  # interleaved: load changes hit every system alike
                for name, engine in engines.items():
                    runs[name].append(run_once(engine, prompts, params, batch))
            if mode == "greedy":  # speculative greedy decoding must be token-identical
                for name in engines:
                    if runs[name][0]["tokens"] != runs["plain"][0]["tokens"]:
                        raise SystemExit(f"{name}: greedy output differs from plain decoding")
            rows_out = {
                name: summarize(r, heads[name].flops_per_token if name in heads else None)
                for name, r in runs.items()
            }
            plain = rows_out["plain"]
            for row in rows_out.values():
                row["speedup"] = row["tokens_per_s"] / plain["tokens_per_s"]
                row["speedup_cpu_time"] = row["tokens_per_cpu_s"] / plain["tokens_per_cpu_s"]
            full = rows_out["spec-full-head"]
            plain_tokens = [t for seq in runs["plain"][0]["tokens"] for t in seq]
            for top_k, ranking in assets["rankings"].items():
                fr = rows_out[f"spec-frspec-{top_k}"]
                fr["drafting_speedup_vs_full_head"] = full["draft_ms_per_token"] / fr["draft_ms_per_token"]
                fr["acceptance_len_vs_full_head"] = fr["acceptance_len"] / full["acceptance_len"]
                subset = set(ranking.subset_ids())
                fr["subset_size"] = len(subset)
                fr["heldout_coverage"] = sum(t in subset for t in plain_tokens) / max(1, len(plain_tokens))
            results.append({"batch": batch, "mode": mode, "systems": rows_out})
            print_table(batch, mode, rows_out)
        del engines
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return results


def print_table(batch: int, mode: str, rows: dict) -> None:
    print(f"\nbatch {batch}, {mode}")
    print(
        f"{'system':19} {'tok/s':>8} {'speedup':>8} {'cpu-time x':>10} {'acc.len':>8} {'draft ms/tok':>12} {'head MFLOP':>10}"
    )
    for name, row in rows.items():
        print(
            f"{name:19} {row['tokens_per_s']:8.1f} {row['speedup']:8.2f} {row['speedup_cpu_time']:10.2f} "
            f"{row.get('acceptance_len', float('nan')):8.2f} {row.get('draft_ms_per_token', float('nan')):12.2f} "
            f"{row.get('draft_head_mflops_per_token', float('nan')):10.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache-dir", default=".cache/rlcpm/speculative")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--k", type=int, default=4, help="num_draft_tokens")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128, help="max_new_tokens (EOS ends a response)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prepare-only", action="store_true")
    parser.add_argument("--out", default="speculative")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    cache = Path(args.cache_dir) / _key(
        TOKENIZER_SIZE, NUM_TRAIN, NUM_RARE_WORDS, FRSPEC_TOP_K
    )  # data, tokenizer
    assets = prepare(cache)
    if args.prepare_only:
        return
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = measure(assets, args)
    payload = {
        "benchmark": "speculative",
        "machine": machine_info(args.threads),
        "load_average": os.getloadavg(),
        "setup": {
            "vocab_size": VOCAB_SIZE,
            "tokenizer_size": TOKENIZER_SIZE,
            "target": TARGET,
            "draft": DRAFT,
            "sft": {"target": TARGET_SFT, "draft": DRAFT_SFT, "num_samples": NUM_TRAIN},
            "frspec_subsets": {
                str(top_k): {"subset_size": len(r.subset_ids()), "corpus_coverage": r.coverage}
                for top_k, r in assets["rankings"].items()
            },
            "num_draft_tokens": args.k,
            "prompts": args.prompts,
            "max_new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "dtype": "float32",
        },
        "results": results,
        "measure_seconds": time.perf_counter() - start,
    }
    print(f"\nwrote {write_result(args.out, payload)}")


if __name__ == "__main__":
    main()
