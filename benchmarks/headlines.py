"""Headline figures of each benchmark result file: what the summary table shows, one row per figure.

Each result file under ``benchmarks/results/`` keeps its scenario's own
layout; one reader per file (:data:`READERS`, keyed by file name) picks out
the figures the scenario is judged by, with the target from BENCHMARKS.md
or the README (the scripts store most targets and verdicts themselves) and
the date and commit of the run from the file's ``machine`` block
(:func:`common.machine_info`). A figure without a target is ``reported``.
Nothing here measures anything: a missing key shows as ``-``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PASS, MISS, REPORTED = "PASS", "MISS", "reported"


@dataclass(frozen=True)
class Headline:
    """One row of the summary table."""

    scenario: str
    metric: str
    measured: str
    target: str
    verdict: str  # PASS, MISS, reported (no target), or a short note
    date: str
    commit: str


def verdict(ok: bool | None) -> str:
    """PASS / MISS, or ``reported`` when there is no target to judge by."""
    return REPORTED if ok is None else PASS if ok else MISS


def number(x: Any, spec: str) -> str:
    """``x`` formatted with ``spec``; ``-`` when missing or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def provenance(d: dict[str, Any]) -> tuple[str, str]:
    """(date, commit) of a result file; a ``+`` after the commit: the tree had uncommitted changes."""
    machine = d.get("machine") or {}
    date = str(machine.get("date") or "-")[:10]
    git = machine.get("git") or {}
    commit = str(git.get("commit") or "-")[:7]
    if git.get("dirty"):
        commit += "+"
    return date, commit


def _rows(scenario: str, d: dict[str, Any], figures: list[tuple[str, str, str, str]]) -> list[Headline]:
    date, commit = provenance(d)
    return [Headline(scenario, m, value, target, v, date, commit) for m, value, target, v in figures]


# ----------------------------------------------------------------------------- one reader per file


def s1(d: dict[str, Any]) -> list[Headline]:
    """Tokens/s of pdserve, then every target the script judged (ratios to HF, prefill vs GEMM, memory)."""
    summary = d.get("summary", {})
    figures = [(f"pdserve output tok/s, {w}", number(summary.get(w, {}).get("pdserve_tokens_per_s"), ".1f"),
                "-", REPORTED) for w in ("fixed", "varied")]
    for t in d.get("targets", []):
        percent = "%" in t["target"]
        value = number(t["value"], ".0%") if percent else number(t["value"], ".2f") + "×"
        goal = f"≥ {t['goal']:.0%}" if percent else f"≥ {t['goal']:g}×"
        figures.append((t["target"], value, goal, verdict(t["met"])))
    return _rows("S1", d, figures)


#: S2's targets: label, request class, metric, baseline configuration.
S2_TARGETS = {
    "bg_itl_p99_vs_a": ("background ITL p99, disagg (c) / aggregated (a)", "bg", "itl_p99_ms", "a"),
    "bg_itl_p99_vs_b": ("background ITL p99, disagg (c) / aggregated chunked (b)", "bg", "itl_p99_ms", "b"),
    "fg_ttft_p50_vs_b": ("long-prompt TTFT p50, disagg (c) / aggregated chunked (b)", "fg", "ttft_p50_ms",
                         "b"),
}


def s2(d: dict[str, Any]) -> list[Headline]:
    """The three interference ratios at the lowest foreground rate, with the two latencies behind each."""
    def at_lowest_rate(config: str, kind: str, metric: str) -> float | None:
        windows = d.get("configs", {}).get(config, {}).get("windows", [])
        return min(windows, key=lambda w: w["rate_per_s"])[kind][metric] if windows else None

    figures = []
    for name, t in d.get("targets", {}).items():
        label, kind, metric, base = S2_TARGETS.get(name, (name, "", "", ""))
        value = number(t.get("ratio"), ".3f")
        if kind:
            c, b = at_lowest_rate("c", kind, metric), at_lowest_rate(base, kind, metric)
            value += f" ({number(c, '.0f')} vs {number(b, '.0f')} ms)"
        ok = None if t.get("verdict") not in ("PASS", "MISS") else t["verdict"] == "PASS"
        note = verdict(ok) if d.get("valid", True) else "invalid run"
        figures.append((label, value, f"≤ {t['limit']:g}", note))
    return _rows("S2", d, figures)


def s3(d: dict[str, Any]) -> list[Headline]:
    """Goodput (req/s) of each configuration under the run's SLO, their ratio, and the missing planner."""
    slo = d.get("slo", {})
    rates = d.get("settings", {}).get("rates") or []
    under = f"TTFT ≤ {number(slo.get('ttft_ms'), 'g')} ms, TPOT ≤ {number(slo.get('tpot_ms'), 'g')} ms"
    figures = []
    for key, res in d.get("configs", {}).items():
        rate = res.get("goodput_rate_per_s")
        value = f"{rate:g} req/s" if rate is not None else f"< {min(rates):g} req/s" if rates else "-"
        disturbed = [f"{r['rate_per_s']:g}" for r in res.get("rates", []) if r.get("disturbed")]
        note = REPORTED if res.get("valid", True) else "invalid run"
        if disturbed:  # another job on the machine took CPU during these rates (metered by the script)
            note += f" (other jobs took CPU at {', '.join(disturbed)} req/s)"
        figures.append((f"goodput, {key} ({under}, ≥ 90% of requests)", value, "-", note))
    for name, value in d.get("goodput_ratios", {}).items():
        figures.append((f"goodput ratio {name.replace('_over_', ' / ')}", number(value, ".2f") + "×", "-",
                        REPORTED))
    goodput = d.get("goodput_rate_per_s", {})
    static = [g for k, g in goodput.items() if k in ("agg", "agg2")]
    if d.get("settings", {}).get("disagg_policy") == "auto" and goodput.get("disagg") is not None and static:
        best = max(g or 0.0 for g in static)
        r = goodput["disagg"] / best if best else math.inf
        figures.append(("disagg with conditional disaggregation (auto) / best of agg, agg2",
                        number(r, ".2f") + "×", "≥ 1×", verdict(r >= 1.0)))
    if not d.get("planner", {}).get("measured", True):
        figures.append(("goodput of the planner's configuration", "not measured", "-",
                        "missing: not in this run's --configs"))
    return _rows("S3", d, figures)


def s4(d: dict[str, Any]) -> list[Headline]:
    """Each transport against its limit per KV size, then the share of transfer hidden behind prefill."""
    target = d.get("config", {}).get("target_ratio", 0.5)
    figures = []
    for r in d.get("results", []):
        if r.get("ids") == "contiguous" and "ratio_to_limit" in r:
            size = f"{r['tokens']} tokens ({r['num_bytes'] / 2**20:g} MiB)"
            figures.append((f"{r['system']} vs {r['limit']}, {size}", number(r["ratio_to_limit"], ".0%"),
                            f"≥ {target:.0%}", verdict(r["ratio_to_limit"] >= target)))
    for o in d.get("overlap", []):
        ok = None if o.get("verdict") not in ("PASS", "MISS") else o["verdict"] == "PASS"
        figures.append((f"transfer hidden by layer-wise streaming, {o['transport']}, {o['tokens']}-token "
                        f"prompt, chunk {o['chunk_size']}", number(o.get("hidden_fraction"), ".0%"),
                        f"≥ {o.get('target_hidden', 0.7):.0%}", verdict(ok)))
    return _rows("S4", d, figures)


def s5(d: dict[str, Any]) -> list[Headline]:
    """The router-overhead checks as the script judged them."""
    figures = []
    for v in d.get("verdicts", []):
        check, value, target = v["check"], v["value"], str(v["target"]) if v["pass"] is not None else "-"
        if "(ms)" in check and v["pass"] is not None:
            check, shown, target = check.replace(" (ms)", ""), number(value, "+.1f") + " ms", target + " ms"
        elif "(ms)" in check:
            check, shown = check.replace(" (ms)", ""), number(value, "+.1f") + " ms"
        elif "req/s" in check:
            shown = number(value, ".0f") + " req/s"
        else:
            shown = number(value, "g")
        figures.append((check, shown, target, verdict(v["pass"])))
    return _rows("S5", d, figures)


def s6(d: dict[str, Any]) -> list[Headline]:
    """KV-aware routing: cache reuse vs the ideal, TTFT against round robin, balance; each kv_aware run."""
    figures = []
    comparisons = d.get("comparisons", {})
    w = d.get("workload", {})
    load = (f" [{w.get('num_prefixes')} prefixes × {w.get('prefix_len')} tokens, "
            f"{w.get('kv_cache_mib_per_worker', 256)} MiB KV/worker]")
    for name, r in d.get("results", {}).items():
        if not name.endswith("kv_aware"):
            continue
        mode, key = name.split("-")[0], name + load
        cached = r.get("cached_vs_ideal")
        figures.append((f"{key}: prompt tokens from cache / ideal", number(cached, ".0%"), "≥ 90%",
                        verdict(None if cached is None else cached >= 0.9)))
        ttft = comparisons.get(mode, {}).get("ttft_p50_vs_round_robin")
        figures.append((f"{key}: TTFT p50 / round_robin's", number(ttft, ".2f"), "≤ 0.5",
                        verdict(None if ttft is None else ttft <= 0.5)))
        balance = (r.get("balance") or {}).get("max_over_mean")
        figures.append((f"{key}: requests per computing worker, max / mean", number(balance, ".2f"), "≤ 1.5",
                        verdict(None if balance is None else balance <= 1.5)))
    return _rows("S6", d, figures)


def s7(d: dict[str, Any]) -> list[Headline]:
    """Goodput of the planner against the best static shape over the phase-changing run, and its actions."""
    configs, best = d.get("configs", {}), d.get("best_static")
    phase_s = (d.get("settings") or {}).get("phase_s", 0)
    run = f"{'/'.join(d.get('phases', []))}, {phase_s:g} s each"
    figures = []
    for name, c in configs.items():
        figures.append((f"{run}: goodput of {name}", number(c.get("goodput_req_s"), ".3f") + " req/s",
                        "-", "-"))
    r = d.get("planner_vs_best_static_goodput")
    if r is not None:
        figures.append((f"planner / best static ({best}) goodput", number(r, ".2f") + "x", ">= 1.2x",
                        verdict(r >= 1.2)))
    planner = configs.get("planner")
    if planner:
        phases = planner.get("phases", [])
        for i, (name, phase) in enumerate(zip(d.get("phases", []), phases, strict=False)):
            statics = [c["phases"][i].get("goodput_req_s") or 0.0 for k, c in configs.items()
                       if k != "planner" and len(c.get("phases", [])) > i]
            top = max(statics, default=0.0)
            share = (phase.get("goodput_req_s") or 0.0) / top if top else None
            met = None if share is None else share >= 0.9
            figures.append((f"phase {i + 1} ({name}): planner / that phase's best static goodput",
                            number(share, ".2f") + "x", ">= 0.9x", verdict(met)))
        settled = max((p.get("planner_actions_after_settling", 0) for p in phases), default=0)
        figures.append(("planner actions per phase after settling (max)", str(settled), "<= 1",
                        verdict(settled <= 1)))
    return _rows("S7", d, figures)


def soak(d: dict[str, Any]) -> list[Headline]:
    """Errors, leaked KV blocks and flagged growth of the soak run."""
    summary, config = d.get("summary", {}), d.get("config", {})
    counters = summary.get("counters", {})
    run = f"soak {config.get('duration', 0):g} s, {config.get('mode', '')} {config.get('model', '')}"
    leaked = sum(v.get("used_blocks", 0) for v in summary.get("leaked", {}).values())
    suspects = summary.get("suspects", [])
    errors = f"{counters.get('num_errors', '-')} of {counters.get('num_completed', '-')} completed"
    figures = [
        (f"{run}: errors", errors, "0", verdict(counters.get("num_errors") == 0)),
        (f"{run}: KV blocks still in use after quiesce", str(leaked), "0", verdict(leaked == 0)),
        (f"{run}: RSS / fd / thread growth flagged", str(len(suspects)), "0", verdict(not suspects)),
    ]
    return _rows("soak", d, figures)


def s8(d: dict[str, Any]) -> list[Headline]:
    """Simulated vs measured percentiles (cells within target), and the simulator's speed."""
    targets = d.get("targets", {})
    figures = []
    for metric, share in d.get("passed", {}).items():
        name, stat = metric.rsplit("_", 1)
        limit = targets.get(stat)
        got, _, total = share.partition("/")
        label = (f"simulated vs measured {name.replace('_ms', '')} {stat} (configs × rates within "
                 f"±{number(limit, '.0%')})")
        if total in ("", "0"):
            figures.append((label, "not measured", "all", "missing: measured runs did not run"))
        else:
            figures.append((label, share, "all", verdict(got == total)))
    for row in d.get("speed", []):
        # CPU seconds when recorded: on the shared machine wall time mostly measures the other jobs
        cpu = row.get("cpu_s")
        shown = (f"{number(cpu, '.1f')} s CPU ({number(row.get('wall_s'), '.0f')} s wall)" if cpu is not None
                 else number(row.get("wall_s"), ".1f") + " s")
        ok = cpu < 60 if cpu is not None else row.get("pass")
        figures.append((f"simulate {row['num_requests']:,} chat requests, {row['deployment']}", shown,
                        "< 60 s", verdict(ok)))
    return _rows("S8", d, figures)


def s9(d: dict[str, Any]) -> list[Headline]:
    """Medians of the elasticity times, flip vs new process, failed requests during a scale-down."""
    figs = d.get("figures", {})

    def median(key: str) -> str:
        return number(figs.get(key, {}).get("median_s"), ".2f") + " s"

    launcher = d.get("launcher", "local")
    load = d.get("scale_down_under_load", {})
    failed = load.get("requests_failed")
    figures = [
        (f"SIGKILLed decode worker → replacement serving ({launcher})", median("decode_death_to_serving"),
         "-", REPORTED),
        (f"SIGKILLed prefill worker → replacement serving ({launcher})", median("prefill_death_to_serving"),
         "-", REPORTED),
        (f"scale → new worker's first request ({launcher})", median("scale_to_first_request_new_process"),
         "-", REPORTED),
        ("role flip → first request, vs a new process", f"{median('flip_to_first_request')} vs "
         f"{median('new_prefill_process_to_first_request')} ({number(d.get('flip_vs_new_process'), '.2f')}×)",
         "-", REPORTED),
        (f"failed requests, scale-down 2+2 → 1+1 under {load.get('clients', '-')} streams",
         f"{number(failed, 'd')} of {number(load.get('requests_ok', 0) + (failed or 0), 'd')}", "0",
         verdict(failed == 0) if failed is not None else REPORTED),
    ]
    for name, seconds in d.get("start_to_models_200_s", {}).items():
        figures.append((f"pdserve serve start → /v1/models 200 ({name})", number(seconds, ".1f") + " s", "-",
                        REPORTED))
    return _rows("S9", d, figures)


def s10(d: dict[str, Any]) -> list[Headline]:
    """SmolLM2-135M: each system's tokens/s at 1 and 16 streams, step vs bound, targets, int8 accuracy."""
    figures = []
    for system, res in d.get("systems", {}).items():
        if "error" in res:
            figures.append((f"{system} output tok/s", "not measured", "-", "failed: see the result file"))
            continue
        one, many = res.get("1_streams", {}), res.get("16_streams", {})
        value = (f"{number(one.get('output_tokens_per_s'), '.1f')} / "
                 f"{number(many.get('output_tokens_per_s'), '.1f')}")
        figures.append((f"{system} output tok/s, 1 / 16 streams", value, "-", REPORTED))
    bounds = d.get("bounds", {})
    for system, fmt in (("pdserve-fp32", "fp32"), ("pdserve-int8", "int8")):
        step = d.get("systems", {}).get(system, {}).get("1_streams", {}).get("decode_step_ms")
        bound = bounds.get(fmt, {}).get("bound_ms_at_21.4GB/s")
        figures.append((f"{system} decode step at 1 stream vs weight-bytes bound",
                        f"{number(step, '.1f')} ms vs {number(bound, '.1f')} ms", "-", REPORTED))
    for t in d.get("targets", []):
        figures.append((t["target"], number(t["value"], ".2f") + "×", f"≥ {t['goal']:g}×", verdict(t["met"])))
    acc = d.get("accuracy") or {}
    if acc:
        figures.append(("int8 vs fp32: teacher-forced top-1 agreement, mean KL",
                        f"{number(acc.get('teacher_forced_top1_agreement'), '.1%')}, "
                        f"{number(acc.get('mean_kl_fp32_int8'), '.4f')}", "-", REPORTED))
    return _rows("S10", d, figures)


#: result file name → its reader, in the order of the summary table.
READERS: dict[str, Callable[[dict[str, Any]], list[Headline]]] = {
    "s1_engine_throughput.json": s1,
    "s2_interference.json": s2,
    "s3_goodput.json": s3,
    "s4_kv_transfer.json": s4,
    "s5_router_overhead.json": s5,
    "s6_kv_routing.json": s6,
    "s6_kv_routing_pressure.json": s6,
    "s7_planner.json": s7,
    "s7_planner_surge.json": s7,
    "s8_sim_fidelity.json": s8,
    "s9_elasticity.json": s9,
    "soak.json": soak,
    "s10_real_model.json": s10,
}
