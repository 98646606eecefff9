"""The ``rlhf`` command line. Importing this module must stay cheap: no torch, no transformers;
every subcommand imports what it needs when it runs."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path

EXIT_USER_ERROR = 2
DISTRIBUTION = "rlhf-toolkit"  # the name in pyproject.toml, which --version reports

_EPILOG = """examples:
  rlhf run recipes/quickstart.yaml                  run the whole quickstart pipeline
  rlhf run recipes/quickstart/sft.yaml train.lr=1e-4 output_dir=runs/my_sft
  rlhf show recipes/quickstart.yaml sft.train.epochs=2
  rlhf show --keys ppo                              every key of the ppo stage: type, default, meaning
  rlhf recipes                                      the shipped recipes
  rlhf recipes copy quickstart/sft.yaml my_sft.yaml
  rlhf status runs/quickstart
  torchrun --nproc_per_node 2 -m rlhf run recipes/quickstart/sft.yaml
  accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes 8 -m rlhf run RECIPE
"""


_RECIPES_HELP = """The recipes shipped in the repository's recipes/ folder: stage recipes, pipeline and round
recipes, and accelerate configs. `rlhf recipes copy NAME DEST` copies one (or a whole folder)
to DEST, or into DEST when it is an existing folder; it never overwrites anything.

A pipeline or round recipe names its stage recipes relative to its own file (quickstart.yaml
names quickstart/sft.yaml): copy the folder they are in beside it, e.g.
  rlhf recipes copy quickstart.yaml my/quickstart.yaml
  rlhf recipes copy quickstart my/quickstart
or copy a folder whose recipes name each other (quickstart/round.yaml names its neighbours).
Every other path in a recipe (data, model_from, output_dir) is relative to the directory you run
rlhf from, as in the shipped recipes.
"""

_ROUND_RUN_HELP = """Run the next round, or finish an interrupted one. KEY=VALUE overrides address the round
recipe's own keys (policy=..., initial_policy=...) or a stage by its name
(rejection_sampling.sampling.k=16). They are stored with the run's recipe (the header of
RUN/round.yaml): later rounds and resumes use them without repeating them, a key given again
takes the new value, and a stage whose config they change runs again (its earlier run is moved
aside), as with any changed config. --recipe replaces the stored recipe and its overrides."""


_FORMAT_HELP = "auto (from the file name), jsonl, json, csv, parquet, datasets, hh-rlhf"


def _data_format(text: str) -> str:
    """An argparse type: a format the data layer reads (else a usage error, exit 2)."""
    from rlhf.data.config import FORMATS

    if text not in FORMATS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(FORMATS)}, got {text!r}")
    return text


def _at_least(low: float, kind: type):
    """An argparse type: a number of ``kind`` no smaller than ``low`` (else a usage error, exit 2)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected at least {low:g}, got {text}")
        return value
    return parse


class _Version(argparse.Action):
    """``--version``: the installed distribution's version, looked up only when asked."""

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version(DISTRIBUTION)
        except PackageNotFoundError:
            found = "(not installed: run `pip install -e .` in the checkout)"
        print(f"{DISTRIBUTION} {found}")
        parser.exit()


def _share(text: str) -> float:
    """A share in (0, 1], for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf",
        description="RLHF toolkit: the Llama 2-Chat fine-tuning method, stage by stage.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version, nargs=0, help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_recipe_commands(sub)
    _add_tools(sub)
    _add_round_commands(sub)
    return parser


def _add_recipe_commands(sub) -> None:
    p = sub.add_parser("run", help="run a stage recipe or a pipeline recipe")
    p.add_argument("recipe", type=Path, help="YAML recipe file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.lr=1e-5")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("show", help="print the fully resolved recipe as YAML, or a stage's keys (--keys)")
    p.add_argument("recipe", type=Path, nargs="?")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--keys", metavar="STAGE", help="every recipe key of STAGE (groups as dotted paths) with "
                   "its type, default and description, instead of a recipe")
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("recipes", help="list the shipped recipes; `recipes copy NAME DEST` copies one",
                       description=_RECIPES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    recipes_sub = p.add_subparsers(dest="recipes_command", metavar="RECIPES_COMMAND")
    c = recipes_sub.add_parser("copy", help="copy a shipped recipe or folder to edit it",
                               description=_RECIPES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("name", help="as `rlhf recipes` lists it (`.yaml` may be left out), or a folder: quickstart")
    c.add_argument("dest", type=Path, help="the new file or folder, or an existing folder to copy into")
    p.set_defaults(func=_cmd_recipes)

    p = sub.add_parser("status", help="show the stages under an output directory")
    p.add_argument("dir", type=Path)
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("report", help="write the progress report of a pipeline or rounds directory")
    p.add_argument("dir", type=Path)
    p.set_defaults(func=_cmd_report)


def _add_tools(sub) -> None:
    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    v = data_sub.add_parser("validate", help="check a data file; list problems as FILE:LINE: field: message")
    v.add_argument("file")
    v.add_argument("--kind", required=True, choices=["sft", "preference", "prompts"])
    v.add_argument("--format", type=_data_format, default="auto", help=_FORMAT_HELP)
    v.add_argument("--column", action="append", default=[], metavar="FIELD=COLUMN",
                   help="map a canonical field to your column, e.g. --column prompt=goal (repeatable)")
    v.add_argument("--is-safety", choices=["true", "false"], help="prompts: is_safety of rows that do not state it")
    v.set_defaults(func=_cmd_data_validate)

    p = sub.add_parser("eval-rm", help="evaluate a reward model on a preference file; print JSON")
    p.add_argument("model_dir", help="a reward_model stage directory or a Hugging Face classifier")
    p.add_argument("data", help="preference pairs in any format the data layer reads (e.g. HH-RLHF)")
    p.add_argument("--format", type=_data_format, default="auto", help=_FORMAT_HELP)
    p.add_argument("--threshold", type=float, default=0.15, help="unsafe-response recall at this probability")
    p.add_argument("--gate-recall", type=_share, default=0.55,
                   help="calibrate the safety gate at this recall of the unsafe responses (key \"gate\"; "
                   "Llama 2's 0.15 had recall 0.55 on its safety test set)")
    p.add_argument("--max-pairs", type=int, help="evaluate only the first N pairs")
    p.add_argument("--out", help="also write the JSON, Markdown and plots into this directory")
    p.set_defaults(func=_cmd_eval_rm)

    p = sub.add_parser("eval-gold", help="quickstart world: gold helpfulness, safety, false refusals of a policy (JSON)")
    p.add_argument("model_dir", help="a policy stage directory or a Hugging Face model directory")
    p.add_argument("--prompts", help="held-out prompts (default: data/quickstart/eval_prompts.jsonl)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--samples", type=_at_least(0, int), default=0,
                   help="also score N sampled answers per prompt (key \"sampled\")")
    p.add_argument("--temperature", type=_at_least(1e-6, float), default=0.7, help="sampling temperature of --samples")
    p.set_defaults(func=_cmd_eval_gold)


def _add_round_commands(sub) -> None:
    p = sub.add_parser("round", help="weekly rounds: add a preference batch, run the next round, status")
    round_sub = p.add_subparsers(dest="round_command", metavar="ROUND_COMMAND", required=True)
    r = round_sub.add_parser("add-batch", help="validate a new preference batch and store an immutable copy")
    r.add_argument("run", type=Path, help="the run directory")
    r.add_argument("--helpfulness", type=Path, help="helpfulness preference pairs")
    r.add_argument("--safety", type=Path, help="safety preference pairs")
    r.add_argument("--format", type=_data_format, default="auto", help=_FORMAT_HELP)
    r.set_defaults(func=_cmd_round_add_batch)
    r = round_sub.add_parser("run", help="run the next round (or finish an interrupted one)", description=_ROUND_RUN_HELP)
    r.add_argument("run", type=Path)
    r.add_argument("--recipe", type=Path, help="round recipe (required the first time; stored in the run, "
                   "replacing the stored one and its overrides)")
    r.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="e.g. policy=rl or rejection_sampling.sampling.k=16; stored with the run's recipe")
    r.set_defaults(func=_cmd_round_run)
    r = round_sub.add_parser("status", help="batches, rounds, stages and headline metrics")
    r.add_argument("run", type=Path)
    r.set_defaults(func=_cmd_round_status)


def _cmd_eval_rm(args: argparse.Namespace) -> int:
    from rlhf.progress import quiet_libraries
    from rlhf.stages import command

    quiet_libraries()

    _must_exist(Path(args.model_dir), Path(args.data))
    print_json(command("eval-rm")(args.model_dir, args.data, args.format, args.threshold, args.max_pairs, args.out,
                                  args.gate_recall))
    return 0


def _cmd_eval_gold(args: argparse.Namespace) -> int:
    from rlhf.progress import quiet_libraries
    from rlhf.world.gold import evaluate_gold

    quiet_libraries()

    print_json(evaluate_gold(args.model_dir, args.prompts, args.max_new_tokens, samples=args.samples,
                             temperature=args.temperature))
    return 0


def _must_exist(*paths: Path) -> None:
    from rlhf.artifacts import InputError

    for path in paths:
        if not path.exists():
            raise InputError(f"{path}: no such file or directory")


def _cmd_report(args: argparse.Namespace) -> int:
    from rlhf.report import write_report

    _must_exist(args.dir)
    write_report(args.dir)
    return 0


def _cmd_round_add_batch(args: argparse.Namespace) -> int:
    from rlhf.rounds import add_batch

    files = {"helpfulness": args.helpfulness, "safety": args.safety}
    print(f"[rlhf] stored batch {add_batch(args.run, files, args.format)}")
    return 0


def _cmd_round_run(args: argparse.Namespace) -> int:
    from rlhf.rounds import run_round

    print(f"[rlhf] round done: {run_round(args.run, args.recipe, args.overrides)}")
    return 0


def _cmd_round_status(args: argparse.Namespace) -> int:
    from rlhf.rounds import round_status

    print(round_status(args.run))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from rlhf.pipeline import run_recipe
    from rlhf.recipe import load_recipe

    out = run_recipe(load_recipe(args.recipe, args.overrides))
    print(f"[rlhf] done: {out}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from rlhf.config import RecipeError
    from rlhf.recipe import load_recipe, read_yaml, to_yaml
    from rlhf.rounds import preview_round

    if args.keys is not None:
        if args.recipe is not None:
            raise RecipeError("show: give a RECIPE or --keys STAGE, not both")
        return _show_keys(args.keys)
    if args.recipe is None:
        raise RecipeError("show: give a RECIPE (with KEY=VALUE overrides), or --keys STAGE")
    if "initial_policy" in read_yaml(args.recipe):  # a round recipe: shown as its first round
        print(to_yaml(preview_round(args.recipe, args.overrides)), end="")
    else:
        print(to_yaml(load_recipe(args.recipe, args.overrides)), end="")
    return 0


def _show_keys(stage: str) -> int:
    import difflib

    from rlhf.config import RecipeError
    from rlhf.recipe import format_keys, recipe_keys
    from rlhf.stages import config_class, stage_names

    if stage not in stage_names():
        close = difflib.get_close_matches(stage, stage_names(), n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise RecipeError(f"--keys: unknown stage {stage!r}{hint}; stages: {', '.join(stage_names())}")
    print(format_keys(recipe_keys(config_class(stage))), end="")
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from rlhf.recipe import copy_shipped, missing_stage_recipes, shipped_recipes, shipped_recipes_dir

    root = shipped_recipes_dir()
    if args.recipes_command == "copy":
        target = copy_shipped(root, args.name, args.dest)
        print(f"[rlhf] copied {args.name} to {target}")
        for path in sorted(target.rglob("*.yaml")) if target.is_dir() else [target]:
            missing = missing_stage_recipes(path)
            if missing:
                print(f"note: {path} names stage recipes relative to its own folder that are not there: "
                      f"{', '.join(missing)}; copy them too, or edit its `recipe:` paths")
        return 0
    rows = shipped_recipes(root)
    width, kind_width = max(len(r.name) for r in rows), max(len(r.kind) for r in rows)
    for r in rows:
        print(f"{r.name:<{width}}  {r.kind:<{kind_width}}  {r.description}".rstrip())
    folders = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir())
    print(f"\n{len(rows)} recipes in {root}; folders (copy one whole): {', '.join(folders)}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from rlhf.pipeline import status_rows

    rows = status_rows(args.dir)
    if not rows:
        print(f"{args.dir}: no stages found")
        return 1
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['stage']:<20} {r['state']:<12} {r.get('detail', '')}".rstrip())
    return 0


def _cmd_data_validate(args: argparse.Namespace) -> int:
    from rlhf.data.validate import run_validate

    columns = {}
    for item in args.column:
        field, sep, column = item.partition("=")
        if not sep:
            print(f"error: --column {item!r}: expected FIELD=COLUMN", file=sys.stderr)
            return EXIT_USER_ERROR
        columns[field] = column
    is_safety = None if args.is_safety is None else args.is_safety == "true"
    return run_validate(args.file, args.kind, args.format, columns=columns or None, is_safety=is_safety)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean a user mistake: print the message, exit 2, no traceback."""
    from rlhf.artifacts import Diverged, DiskFull, InputError
    from rlhf.config import RecipeError
    from rlhf.data import DataError

    return RecipeError, InputError, DataError, DiskFull, Diverged


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The arguments; KEY=VALUE overrides may also follow an option (``round run RUN --recipe R
    k=v``), which argparse alone does not allow after a positional list."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\n[rlhf] interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, _user_errors()):
            from rlhf.data.validate import error_text

            print(f"error: {error_text(exc)}", file=sys.stderr)
            return EXIT_USER_ERROR
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:  # a write no rlhf.artifacts.writing covers
            print(f"error: no space left on the device of {exc.filename or 'the output directory'}; free space "
                  "and run the same command again", file=sys.stderr)
            return EXIT_USER_ERROR
        raise


def print_json(data: object) -> None:
    print(json.dumps(data, indent=2, default=float))


if __name__ == "__main__":
    sys.exit(main())
