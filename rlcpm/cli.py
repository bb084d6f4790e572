"""The `rlcpm` command line: validate, train, sft, quickstart, report, freq, bench."""

from __future__ import annotations

import argparse
import os
import sys

from rlcpm import __version__
from rlcpm.errors import RecipeError, RlcpmError

EXIT_BAD_INPUT = 2


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    # As under `python -m`: modules in the working directory import (a recipe's `fn: my_rewards:f`,
    # `rlcpm bench`); a console script's sys.path lacks it.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return int(args.handler(args) or 0)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RlcpmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: whatever was checkpointed is kept", file=sys.stderr)
        return 130


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlcpm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"rlcpm {__version__}")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("validate", help="check a recipe and print it resolved (exit 2 on errors)")
    _recipe_args(p)
    p.set_defaults(handler=_validate)

    p = sub.add_parser("train", help="run a recipe (GRPO, DPO or SFT)")
    _recipe_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in run_dir")
    p.set_defaults(handler=_train)

    p = sub.add_parser(
        "sft",
        help="supervised fine-tuning on a recipe's data and model (a grpo/dpo algorithm section is replaced by sft defaults)",
    )
    _recipe_args(p)
    p.add_argument("--resume", action="store_true")
    p.set_defaults(handler=_sft)

    p = sub.add_parser("quickstart", help="build a tiny model, then RL-train it on arithmetic (CPU, minutes)")
    p.add_argument("--run-dir", default=None, help="default: the recipe's run_dir (runs/quickstart)")
    p.add_argument(
        "--recipe", default=None, help="default: recipes/quickstart.yaml (run from the repository root)"
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.total_steps=5")
    p.set_defaults(handler=_quickstart)

    p = sub.add_parser("report", help="write PNG plots of a run's metrics.jsonl")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="default: RUN_DIR/plots")
    p.set_defaults(handler=_report)

    p = sub.add_parser("freq", help="FR-Spec: rank token ids by frequency in a corpus")
    p.add_argument("dataset", help="a JSONL/JSON/Parquet/CSV file or a datasets directory")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--top-k", type=int, default=32768)
    p.add_argument("-o", "--output", required=True)
    p.add_argument(
        "--fields", nargs="*", default=None, help="text columns to count (default: prompt, response)"
    )
    p.set_defaults(handler=_freq)

    p = sub.add_parser("bench", help="run a benchmark from benchmarks/ by name (from the repository root)")
    p.add_argument("name", help="; ".join(available_benchmarks()) or "a module of benchmarks/")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(handler=_bench)
    return parser


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument(  # default=[]: without one, argparse names a "*" positional as required
        "overrides",
        nargs="*",
        default=[],
        help="dotted overrides, e.g. learner.lr=1e-5 rollout.chunk_tokens=512",
    )


def _validate(args) -> int:
    """Print the resolved recipe; exit 2 on a schema problem, a reward that does not resolve or a
    synthetic task option the generator does not take.
    Paths missing on this machine are notes only: a recipe may be meant for another one."""
    from rlcpm.config import load_recipe
    from rlcpm.rewards import resolve_terms
    from rlcpm.trainer.preflight import (
        check_data_paths,
        check_model_source,
        check_sparse_attention,
        check_synthetic_data,
    )

    recipe = load_recipe(args.recipe, args.overrides)
    problems = []  # every problem at once, as the schema's are
    for i, spec in enumerate(recipe.rewards):
        try:
            resolve_terms([spec])
        except RlcpmError as err:
            problems.append(f"rewards[{i}]: {err}")
    try:
        check_sparse_attention(recipe)
    except RecipeError as err:
        problems += err.problems
    for split in ("train", "eval"):
        try:
            check_synthetic_data(recipe, (split,))
        except RlcpmError as err:
            problems.append(str(err))
    if problems:
        raise RecipeError(problems, source=args.recipe)
    print(recipe.to_yaml(), end="")
    for check in (check_model_source, check_data_paths):
        try:
            check(recipe)
        except RlcpmError as err:
            print(f"note: on this machine, {err}", file=sys.stderr)
    return 0


def _train(args) -> int:
    from rlcpm.config import load_recipe
    from rlcpm.trainer import train

    _report_result(train(load_recipe(args.recipe, args.overrides), resume=args.resume))
    return 0


def _report_result(result) -> None:
    for line in result.accuracy_lines():
        print(line)
    print(
        f"run directory: {result.run_dir}"
        + (f"; final model: {result.final_model_dir}" if result.final_model_dir else "")
    )


def _sft(args) -> int:
    from rlcpm.trainer import train

    _report_result(train(sft_recipe(args.recipe, args.overrides), resume=args.resume))
    return 0


def sft_recipe(path: str, overrides: list[str]):
    """The recipe at `path` run as SFT: an sft algorithm section is kept; a grpo or dpo one is
    replaced by the sft defaults (its keys mean nothing to SFT). Overrides apply last."""
    from rlcpm.config import load_recipe

    try:  # what the file's own algorithm section is (algorithm.* overrides may be sft keys)
        written = load_recipe(path, [o for o in overrides if not o.startswith("algorithm")])
        name = written.algorithm.name
    except RecipeError:
        name = "sft"  # the load below reports the problems
    if name == "sft":
        return load_recipe(path, [*overrides, "algorithm.name=sft"])
    print(f"rlcpm sft: {path} has a {name} algorithm section; SFT uses the sft defaults "
          "(override them as algorithm.epochs=..., algorithm.samples_per_step=..., algorithm.max_seq_len=...)",
          file=sys.stderr)  # fmt: skip
    return load_recipe(path, ["algorithm={name: sft}", *overrides])


def _quickstart(args) -> int:
    from rlcpm.quickstart import run_quickstart

    run_quickstart(run_dir=args.run_dir, recipe_path=args.recipe, overrides=args.overrides)
    return 0


def _report(args) -> int:
    from rlcpm.report import write_report

    for path in write_report(args.run_dir, args.out):
        print(path)
    return 0


def _freq(args) -> int:
    from rlcpm.rollout.frspec import build_frequency_file

    ranking = build_frequency_file(
        args.dataset, args.tokenizer, top_k=args.top_k, output=args.output, fields=args.fields
    )
    print(
        f"wrote {args.output}: the top {len(ranking.token_ids)} ids cover {ranking.coverage:.1%} of the "
        f"{ranking.num_tokens_counted} tokens counted ({len(ranking.always_kept)} always kept)"
    )
    return 0


def _bench(args) -> int:
    import runpy

    names = available_benchmarks()
    if not names:
        raise RlcpmError("no benchmarks/ here: run `rlcpm bench` from the repository root")
    if args.name not in names:
        raise RlcpmError(f"unknown benchmark {args.name!r}; available: {', '.join(names)}")
    sys.argv = [f"benchmarks.{args.name}", *args.args]
    runpy.run_module(f"benchmarks.{args.name}", run_name="__main__")
    return 0


def available_benchmarks() -> list[str]:
    """The runnable modules of ./benchmarks (the repository's; not its helpers)."""
    from pathlib import Path

    root = Path.cwd() / "benchmarks"
    if not (root / "__init__.py").is_file():
        return []
    return sorted(p.stem for p in root.glob("*.py") if "__main__" in p.read_text())


if __name__ == "__main__":
    sys.exit(main())
