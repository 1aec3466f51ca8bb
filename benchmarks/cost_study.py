"""Cost of disaggregated vs aggregated serving at equal SLO, by simulation on paper hardware (docs/cost.md).

For each model (a 70B-class and an 8B-class one), workload mix (chat,
long-prompt summarisation/RAG, long-output generation), SLO level (tight,
relaxed) and hardware setting (all-H100; H100 prefill + a cheaper decode
part), ``pdserve plan``'s search (:mod:`pdserve.sim.plan`) finds the
cheapest aggregated shape and the cheapest disaggregated shape that meet
the SLO at ≥ 90% attainment on the same seeded requests; the ratio of
their costs per hour (= per output token: same rate) is the answer.

The step times are roofline figures (:mod:`pdserve.sim.roofline`, stated
efficiencies), not measurements: nothing here ran on a GPU.

    python benchmarks/cost_study.py [--num-requests 200] [--max-workers 16] [--only llama-3-8b]

Writes ``benchmarks/results/cost_study.json`` and the generated part of
``docs/cost.md`` (between its ``cost-study`` markers).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Any

from common import REPO_ROOT, RESULTS_DIR, machine_info, write_json

from pdserve.bench.arrivals import ArrivalConfig
from pdserve.bench.metrics import SLO
from pdserve.bench.workload import WorkloadConfig, make_workload
from pdserve.config import SchedulerConfig
from pdserve.sim.deploy import PromptEncoder, make_requests
from pdserve.sim.hardware import accelerator, paper_model
from pdserve.sim.plan import Planner, PlanResult, Verdict, candidate_kinds, search

RESULTS = RESULTS_DIR / "cost_study.json"
DOC = REPO_ROOT / "docs" / "cost.md"
START, END = "<!-- cost-study:start -->", "<!-- cost-study:end -->"


@dataclass(frozen=True)
class Model:
    name: str
    rate: float  # requests/s offered
    slos: dict[str, str]  # level → SLO spec


MODELS = [
    Model("llama-3-70b", 16.0, {"tight": "ttft_ms=500,tpot_ms=40", "relaxed": "ttft_ms=2000,tpot_ms=100"}),
    Model("llama-3-8b", 64.0, {"tight": "ttft_ms=200,tpot_ms=20", "relaxed": "ttft_ms=1000,tpot_ms=60"}),
]
MIXES = {
    "chat": WorkloadConfig(kind="chat"),
    "long-prompt (summarisation/RAG)": WorkloadConfig(kind="summarization"),
    "long-output generation": WorkloadConfig(kind="synthetic", input_len="lognormal:200:0.6:32:1024",
                                             output_len="lognormal:800:0.4:256:2048"),
}
SETTINGS = {
    # name → (aggregated parts, prefill parts, decode parts)
    "H100": (["h100"], ["h100"], ["h100"]),
    "H100 P + cheaper D": (["h100", "a100", "l40s"], ["h100"], ["a100", "l40s"]),
}
TPS = [1, 2, 4, 8]


def study_one(model: Model, mix: str, level: str, setting: str, args: argparse.Namespace) -> dict[str, Any]:
    arch = paper_model(model.name)
    agg_parts, p_parts, d_parts = SETTINGS[setting]
    kinds = [candidate_kinds(arch, [accelerator(n) for n in parts], TPS, 16, "bf16", per_part=1)
             for parts in (agg_parts, p_parts, d_parts)]
    encoder = PromptEncoder(model.name, "completions", arch.vocab_size)
    planned = make_requests(make_workload(MIXES[mix]), ArrivalConfig(rate=model.rate, seed=0), encoder,
                            arch.max_position_embeddings, args.num_requests, None)
    planner = Planner(arch, planned, model.rate, SLO.parse(model.slos[level]), SchedulerConfig(), 16, "bf16",
                      0.9, args.max_workers, generous_decode=4)
    t0 = time.perf_counter()
    agg: PlanResult = search(planner, kinds[0], [], [], modes=("aggregated",))
    dis: PlanResult = search(planner, [], kinds[1], kinds[2], modes=("disaggregated",))
    a, d = agg.best, dis.best
    row = {
        "model": model.name, "rate_per_s": model.rate, "mix": mix, "slo_level": level,
        "slo": model.slos[level], "setting": setting,
        "aggregated": verdict_json(a), "disaggregated": verdict_json(d),
        "closest_aggregated": None if a else verdict_json(agg.closest),
        "closest_disaggregated": None if d else verdict_json(dis.closest),
        "cost_ratio_disagg_over_agg": d.cost_per_hour / a.cost_per_hour if a and d else None,
        "num_shapes_simulated": len(planner.verdicts), "wall_s": time.perf_counter() - t0,
    }
    ratio = row["cost_ratio_disagg_over_agg"]
    print(f"{model.name:12} {mix[:20]:20} {level:7} {setting:18} agg {describe(a):34} "
          f"disagg {describe(d):44} ratio {'-' if ratio is None else f'{ratio:.2f}'} "
          f"({row['wall_s']:.0f} s)", flush=True)
    return row


def verdict_json(v: Verdict | None) -> dict[str, Any] | None:
    if v is None:
        return None
    return {"shape": v.shape.describe(), "cost_per_hour": v.cost_per_hour, "accelerators": v.shape.num_accels,
            "cost_per_m_output_tokens": v.cost_per_m_output_tokens, "attainment": v.attainment,
            "ttft_p90_ms": v.ttft_p90_ms, "tpot_p90_ms": v.tpot_p90_ms}


def describe(v: Verdict | None) -> str:
    return "none meets the SLO" if v is None else f"{v.shape.describe()} ${v.cost_per_hour:.2f}/h"


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    """The generated tables and findings of docs/cost.md."""
    lines = [f"Generated by `{command}` on {time.strftime('%Y-%m-%d')}; "
             "roofline step times, not measurements.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        lines += [f"### {model} at {mrows[0]['rate_per_s']:g} req/s", "",
                  "| mix | SLO | hardware | cheapest aggregated | cheapest disaggregated "
                  "| disagg / agg cost |",
                  "|---|---|---|---|---|---|"]
        for r in mrows:
            a, d = r["aggregated"], r["disaggregated"]

            def cell(v: dict[str, Any] | None) -> str:
                return "none meets it" if v is None else (f"{v['shape']}: ${v['cost_per_hour']:.2f}/h, "
                                                          f"${v['cost_per_m_output_tokens']:.3f}/M tok")
            ratio = r["cost_ratio_disagg_over_agg"]
            shown = "-" if ratio is None else f"**{ratio:.2f}**"
            lines.append(f"| {r['mix']} | {r['slo_level']} ({r['slo']}) | {r['setting']} | {cell(a)} | "
                         f"{cell(d)} | {shown} |")
        lines.append("")
    ratios = [r for r in rows if r["cost_ratio_disagg_over_agg"] is not None]
    cheaper = [r for r in ratios if r["cost_ratio_disagg_over_agg"] < 0.995]
    dearer = [r for r in ratios if r["cost_ratio_disagg_over_agg"] > 1.005]
    lines += ["Findings (computed from the table):", "",
              f"- disaggregation is cheaper in {len(cheaper)} of {len(ratios)} comparable cells, costlier in "
              f"{len(dearer)}, equal in {len(ratios) - len(cheaper) - len(dearer)}."]
    if cheaper:
        best = min(cheaper, key=lambda r: r["cost_ratio_disagg_over_agg"])
        lines.append(f"- largest saving: {1 - best['cost_ratio_disagg_over_agg']:.0%} ({best['model']}, "
                     f"{best['mix']}, {best['slo_level']} SLO, {best['setting']}).")
    for r in dearer:
        lines.append(f"- does not pay: {r['model']}, {r['mix']}, {r['slo_level']} SLO, {r['setting']} "
                     f"(×{r['cost_ratio_disagg_over_agg']:.2f}).")
    missing = [r for r in rows if r["cost_ratio_disagg_over_agg"] is None]
    for r in missing:
        which = "aggregated" if r["aggregated"] is None else "disaggregated"
        lines.append(f"- no {which} shape met the SLO within {r['model']}'s limits: {r['mix']}, "
                     f"{r['slo_level']}, {r['setting']}.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--max-workers", type=int, default=16)
    p.add_argument("--only", default=None, help="one model")
    args = p.parse_args()
    machine = machine_info()
    rows = []
    t0 = time.perf_counter()
    for model in [m for m in MODELS if args.only in (None, m.name)]:
        for mix in MIXES:
            for level in model.slos:
                for setting in SETTINGS:
                    rows.append(study_one(model, mix, level, setting, args))
    if args.only and RESULTS.exists():  # keep the other models' rows of an earlier run
        rows = [r for r in json.loads(RESULTS.read_text())["rows"] if r["model"] != args.only] + rows
        rows.sort(key=lambda r: [m.name for m in MODELS].index(r["model"]))
    out = {"scenario": "cost study", "machine": machine, "settings": vars(args), "rows": rows,
           "wall_s": time.perf_counter() - t0}
    write_json(RESULTS, out)
    command = machine["command"] or "python benchmarks/cost_study.py"
    text = DOC.read_text() if DOC.exists() else f"{START}\n{END}\n"
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    DOC.write_text(f"{head}{START}\n{markdown(rows, command)}\n{END}{tail}")
    print(f"wrote {RESULTS} and {DOC} ({out['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
