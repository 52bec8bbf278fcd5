"""``python -m rlhf.compare --config configs/gold/compare.yaml [--methods a,b] [--seeds 0,1]
[--dry-run] [--report-only] [--prune-snapshots]``: see :mod:`rlhf.compare`.

Exit codes: 0 done, 1 a run or evaluation failed (the others went on), 2 a bad config or
missing inputs, 3 another comparison holds ``out``, 128 + n stopped by signal n.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from rlhf.compare.config import CompareConfigError, load_config, missing_inputs, select
from rlhf.compare.runs import plan, run_comparison
from rlhf.console import quiet_known_warnings
from rlhf.pipeline_state import PipelineLockedError

EXIT_LOCKED = 3


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _seeds(text: str) -> list[int]:
    try:
        return [int(part) for part in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds: expected integers separated by commas, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rlhf.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="comparison config (e.g. configs/gold/compare.yaml)")
    p.add_argument("--methods", type=_names, default=None, help="only these methods (comma-separated)")
    p.add_argument("--seeds", type=_seeds, default=None, help="only these seeds (comma-separated)")
    p.add_argument("--dry-run", action="store_true", help="list what would run (and why), run nothing")
    p.add_argument("--report-only", action="store_true", help="write the report from what is complete")
    p.add_argument("--prune-snapshots", action="store_true",
                   help="after a run is evaluated, delete its snapshots' merged models (disk; "
                        "re-evaluating them then needs the run trained again)")
    p.add_argument("--progress", action="store_true", help="progress bars while sampling")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison ``argv`` describes; the exit code (see the module doc)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_known_warnings()
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        methods, seeds = select(config, args.methods, args.seeds)
    except CompareConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for action in plan(config, methods, seeds):
            print(action.line())
        for problem in missing_inputs(config, methods):
            print(f"warning: {problem}")
        return 0
    from rlhf.compare.report import write_report

    if not args.report_only:
        problems = missing_inputs(config, methods)
        if problems:
            print("error: " + "\nerror: ".join(problems), file=sys.stderr)
            return 2
        from rlhf.compare.evaluation import PolicyEvaluator

        evaluator = PolicyEvaluator(config, progress=args.progress)
        try:
            outcome = run_comparison(config, methods, seeds, evaluator, prune=args.prune_snapshots)
        except PipelineLockedError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_LOCKED
        finally:
            evaluator.close()
        if outcome.exit_code >= 128:
            return outcome.exit_code
    else:
        outcome = None
    paths = write_report(config)
    print(paths["markdown"].read_text())
    print(f"wrote {paths['markdown']}, {paths['json']} and {paths['figure']}")
    return 0 if outcome is None else outcome.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
