"""``pdserve serve``'s initial pools: ``--mixed`` defaults by mode and joins disaggregated deployments."""

from __future__ import annotations

import pytest

from pdserve.cli import _build_parser
from pdserve.launch.serve import targets


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        ([], {"prefill": 1, "decode": 1, "mixed": 0}),
        (["--prefill", "2", "--decode", "3"], {"prefill": 2, "decode": 3, "mixed": 0}),
        (["--prefill", "1", "--decode", "1", "--mixed", "1"], {"prefill": 1, "decode": 1, "mixed": 1}),
        (["--prefill", "0", "--decode", "1", "--mixed", "2"], {"prefill": 0, "decode": 1, "mixed": 2}),
        (["--mode", "aggregated"], {"prefill": 0, "decode": 0, "mixed": 1}),
        (["--mode", "aggregated", "--mixed", "3", "--prefill", "2"], {"prefill": 0, "decode": 0, "mixed": 3}),
    ],
)
def test_initial_pools(argv: list[str], want: dict[str, int]) -> None:
    parser, _ = _build_parser()
    assert targets(parser.parse_args(["serve", *argv])) == want
