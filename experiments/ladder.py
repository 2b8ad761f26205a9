"""The cold-start ladder on the bundled model: every start-up method, timed side by side.

    ./run.sh bench [--model tiny|small|PATH] [--repeats 3] [fastvllm bench options] [-- VLLM_ARGS]

Builds the bundled model if needed, then runs ``fastvllm bench MODEL`` (see its --help):
every method (1-13, see fastvllm/bench/methods.py; narrow with --methods 1,3,8,9) x
eager/compiled x warm/evicted page cache x repeats; after each start-up, the server's decode
tokens/s. Results go to a new directory experiments/results/ladder-<model>-<time>/:
runs/*.json (raw, one per run), summary.csv, table.md and ladder.png.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from harness import bundled_model


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--model", default="tiny", help="tiny, small (bundled, built once) or a model directory")
    cli.add_argument("--repeats", type=int, default=3)
    args, rest = cli.parse_known_args()
    model = bundled_model(args.model) if args.model in ("tiny", "small") else Path(args.model)
    cmd = [sys.executable, "-m", "fastvllm.cli", "bench", str(model), "--repeats", str(args.repeats), *rest]
    os.execv(sys.executable, cmd)


if __name__ == "__main__":
    main()
