"""`agecls-compare`: two runs on the same faces, with a paired bootstrap of their difference."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agecls.evaluation.compare import SPLITS, CompareError, compare_runs, render


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="agecls-compare",
        description=__doc__.split("\n\n")[0],
        epilog="See README, 'Comparing two runs'.",
    )
    parser.add_argument("run_a", type=Path, help="run folder (or its predictions_<split>.csv): A")
    parser.add_argument("run_b", type=Path, help="run folder (or its predictions_<split>.csv): B")
    parser.add_argument("--split", default="val", choices=SPLITS, help="val (default: choose on it) or test")
    parser.add_argument("--attribute", help="multitask runs: age, gender or ethnicity (default: the first)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling (default 0)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    if args.n_boot < 1:
        parser.error(f"--n-boot {args.n_boot}: must be at least 1")
    try:
        report = compare_runs(args.run_a, args.run_b, args.split, args.attribute, args.n_boot, args.seed)
    except CompareError as exc:
        print(f"agecls-compare: {exc}", file=sys.stderr)
        return 1
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
