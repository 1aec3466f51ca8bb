"""``python -m pdserve.bench``: the ``pdserve bench`` options, on their own."""

from __future__ import annotations

import argparse
import logging
import sys

from pdserve.bench.cli import configure_parser, run_bench


def main(argv: list[str] | None = None) -> int:
    """Parse the options and run the benchmark."""
    parser = argparse.ArgumentParser(
        prog="python -m pdserve.bench", description="Open-loop load generator for OpenAI-compatible servers."
    )
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ERROR")
    configure_parser(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
