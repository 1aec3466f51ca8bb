"""``pdserve plan``: the cheapest deployment that meets TTFT/TPOT (or ITL) SLOs at a request rate.

The workload is a bench workload (``--workload chat`` …, same options as
``pdserve bench``) or a recorded trace (``--trace result.json`` from
``pdserve bench --output``: its requests' prompt and output lengths, arriving
at ``--request-rate``). Hardware lists (``--hardware h100,a100``, or
``--prefill-hardware`` / ``--decode-hardware`` for the pools of a
disaggregated shape) and ``--tp 1,2,4,8`` bound the search.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from pdserve.errors import ConfigError, PDServeError


def add_plan_parser(sub: Any) -> None:
    """Add ``pdserve plan``."""
    from pdserve.bench.cli import add_workload_args

    p = sub.add_parser("plan", help="cheapest deployment shape meeting SLOs (simulated on paper hardware)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="llama-3-8b, llama-3-70b, qwen2.5-7b, ... or a preset")
    p.add_argument("--request-rate", type=float, required=True, help="requests per second (Poisson)")
    p.add_argument("--slo", required=True, metavar="ttft_ms=..,tpot_ms=..", help="also itl_ms, e2e_ms")
    p.add_argument("--attainment-target", type=float, default=0.9)
    p.add_argument("--hardware", default="h100,h200,a100,l40s,mi300x,trn1", help="accelerators to consider")
    p.add_argument("--prefill-hardware", default=None, help="prefill pool's (default --hardware)")
    p.add_argument("--decode-hardware", default=None, help="decode pool's (default --hardware)")
    p.add_argument("--tp", default="1,2,4,8", help="TP degrees to consider")
    p.add_argument("--modes", default="aggregated,disaggregated")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp8"])
    p.add_argument("--price", action="append", default=[], metavar="HW=USD", help="override a price per hour")
    p.add_argument("--max-workers", type=int, default=16, help="per pool")
    p.add_argument("--num-requests", type=int, default=300, help="requests simulated per shape")
    p.add_argument("--trace", default=None, help="a `pdserve bench --output` file: its request lengths")
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--output", default=None, help="write every verdict as JSON here")
    p.add_argument("--plots", default=None, metavar="DIR", help="plot cost vs rate (matplotlib)")
    p.add_argument("--plot-rates", default=None, help="rates for --plots (default: ¼×, ½×, 1×, 2× the rate)")
    add_workload_args(p)


def _names(spec: str | None, default: str) -> list[str]:
    return [n.strip() for n in (spec or default).split(",") if n.strip()]


def trace_lengths(path: str) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens asked) of every successful request of a bench result file."""
    try:
        data = json.loads(Path(path).read_text())
        rows = [r for run in data["runs"] for r in run.get("requests", [])]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read trace {path} (a `pdserve bench --output` file): {exc}") from exc
    lengths = [(int(r["num_prompt_tokens"]), int(r.get("max_tokens") or r["num_output_tokens"]))
               for r in rows if r.get("error_type") is None and r.get("num_prompt_tokens")]
    if not lengths:
        raise ConfigError(f"trace {path} has no successful request with per-request records")
    return lengths


def planned_requests(args: argparse.Namespace, rate: float, arch: Any) -> list[Any]:
    """The seeded requests every shape is judged on."""
    from pdserve.bench.arrivals import ArrivalConfig
    from pdserve.bench.cli import workload_config
    from pdserve.bench.workload import make_workload
    from pdserve.sim.deploy import PlannedRequest, PromptEncoder, make_requests, workload_counter
    from pdserve.sim.simulator import SimRequest

    arrivals = ArrivalConfig(rate=rate, seed=args.seed)
    if args.trace:
        lengths = trace_lengths(args.trace)
        out = []
        for i, offset in zip(range(args.num_requests), arrivals.offsets_s(), strict=False):
            n_in, n_out = lengths[i % len(lengths)]
            ids = tuple(3 + (7919 * i + k) % (arch.vocab_size - 3) for k in range(n_in))  # no shared prefixes
            out.append(PlannedRequest(SimRequest(offset, ids, max(n_out, 1)), warmup=False))
        return out
    encoder = PromptEncoder(args.model, "completions", arch.vocab_size)
    specs = make_workload(workload_config(args), workload_counter(args.tokenizer, encoder, args.model))
    return make_requests(specs, arrivals, encoder, arch.max_position_embeddings, args.num_requests, None)


def _fmt(v: Any) -> str:
    s = v.shape.describe()
    return (f"{s:<44} ${v.cost_per_hour:>8.2f}/h  ${v.cost_per_m_output_tokens:>7.3f}/M out  "
            f"attain {v.attainment:6.1%}  TTFT p90 {v.ttft_p90_ms:7.0f} ms  TPOT p90 {v.tpot_p90_ms:6.1f} ms")


def run_plan(args: argparse.Namespace) -> int:
    """Run ``pdserve plan``; 0 with an answer, 1 when no shape meets the SLO, 2 on bad options."""
    try:
        return _plan(args)
    except (PDServeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def make_planner(args: argparse.Namespace, rate: float) -> tuple[Any, Any, Any, Any]:
    """The planner and the candidate kinds (mixed, prefill, decode) of the options."""
    from pdserve.bench.metrics import SLO
    from pdserve.config import SchedulerConfig
    from pdserve.sim.hardware import accelerator, paper_model
    from pdserve.sim.plan import Planner, candidate_kinds

    prices: dict[str, float] = {}
    for item in args.price:
        name, sep, value = item.partition("=")
        try:
            prices[name.strip().lower()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ConfigError(f"--price {item!r}: write HW=USD_PER_HOUR, e.g. h100=2.5")
    try:
        tps = [int(t) for t in _names(args.tp, "1")]
    except ValueError:
        raise ConfigError(f"--tp {args.tp!r}: give integers separated by commas") from None
    arch = paper_model(args.model)

    def accels(spec: str | None) -> list[Any]:
        return [accelerator(n, prices.get(n.lower())) for n in _names(spec, args.hardware)]

    block_size = 16
    kinds = [candidate_kinds(arch, accels(spec), tps, block_size, args.precision)
             for spec in (args.hardware, args.prefill_hardware, args.decode_hardware)]
    sched = SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                            max_num_seqs=args.max_num_seqs, chunk_size=args.chunk_size)
    planner = Planner(arch, planned_requests(args, rate, arch), rate, SLO.parse(args.slo), sched, block_size,
                      args.precision, args.attainment_target, args.max_workers)
    return planner, kinds[0], kinds[1], kinds[2]


def _plan(args: argparse.Namespace) -> int:
    from pdserve.sim.plan import MODES, search

    modes = _names(args.modes, ",".join(MODES))
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ConfigError(f"--modes {','.join(bad)}: use {' or '.join(MODES)}")
    if not args.request_rate > 0 or math.isinf(args.request_rate):
        raise ConfigError("--request-rate must be a finite rate > 0")
    planner, mixed, prefill, decode = make_planner(args, args.request_rate)
    result = search(planner, mixed, prefill, decode, modes)
    print(f"plan: {args.model}, {args.trace or args.workload} at {args.request_rate:g} req/s, SLO {args.slo} "
          f"at ≥ {args.attainment_target:.0%}; {result.num_evaluated} shapes simulated "
          f"({args.num_requests} requests each, roofline step times)")
    code = 0
    if result.best is None:
        print("no shape meets the SLO within the limits (--max-workers, --hardware, --tp).")
        if result.closest is not None:
            print(f"closest:   {_fmt(result.closest)}")
        code = 1
    else:
        print(f"cheapest:  {_fmt(result.best)}")
        for v in result.runners_up:
            print(f"runner-up: {_fmt(v)}")
        for label, mode_best in (("best aggregated", result.best_aggregated),
                                 ("best disaggregated", result.best_disaggregated)):
            if mode_best is not None and mode_best is not result.best and mode_best not in result.runners_up:
                print(f"{label}: {_fmt(mode_best)}")
    if args.output:
        Path(args.output).write_text(json.dumps({
            "args": {k: v for k, v in vars(args).items() if not callable(v)},
            "verdicts": [{"shape": v.shape.describe(), "cost_per_hour": v.cost_per_hour,
                          "cost_per_m_output_tokens": v.cost_per_m_output_tokens, "attainment": v.attainment,
                          "ttft_p90_ms": v.ttft_p90_ms, "tpot_p90_ms": v.tpot_p90_ms,
                          "decisions": v.decisions}
                         for v in planner.verdicts.values()],
            "best": None if result.best is None else result.best.shape.describe(),
        }, indent=1, default=str) + "\n")
    if args.plots:
        _plots(args, result)
    return code


def _plots(args: argparse.Namespace, result: Any) -> None:
    """Cost per million output tokens vs rate for the best aggregated and disaggregated kinds."""
    from pdserve.bench.plots import MISSING_MESSAGE, have_matplotlib

    if not have_matplotlib():
        print(f"warning: {MISSING_MESSAGE}; no plots written", file=sys.stderr)
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = ([float(r) for r in _names(args.plot_rates, "")] if args.plot_rates
             else [args.request_rate * f for f in (0.25, 0.5, 1.0, 2.0)])
    series: dict[str, list[tuple[float, float]]] = {}
    for label, v in (("aggregated", result.best_aggregated), ("disaggregated", result.best_disaggregated)):
        if v is None:
            continue
        s = v.shape
        if s.mixed is not None:
            kinds = s.mixed[0].label
        else:
            assert s.prefill is not None and s.decode is not None
            kinds = f"{s.prefill[0].label} P + {s.decode[0].label} D"
        for rate in rates:
            planner, *_ = make_planner(args, rate)
            found = (planner.best_aggregated(s.mixed[0]) if s.mixed is not None else
                     planner.best_disaggregated(s.prefill[0], s.decode[0]))
            if found is not None:
                series.setdefault(f"{label} ({kinds})", []).append((rate, found.cost_per_m_output_tokens))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in series.items():
        ax.plot([r for r, _ in pts], [c for _, c in pts], marker="o", label=label)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("USD per million output tokens")
    ax.set_title(f"{args.model}, {args.trace or args.workload}, SLO {args.slo}")
    ax.legend()
    out = Path(args.plots)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "plan_cost_vs_rate.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"plot written to {path}")
