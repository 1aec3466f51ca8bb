"""S1's printed table and target verdicts, from the result dict of :mod:`s1_engine_throughput`."""

from __future__ import annotations

import math
from typing import Any

MIB = 2**20
# The targets.
VARIED_VS_HF_BATCHED, VARIED_VS_HF_SINGLE, FIXED_VS_HF_BATCHED, PREFILL_OF_GEMM = 3.0, 10.0, 1.0, 0.60


def mem_above_imports(row: dict[str, Any]) -> float:
    """Peak RSS above the process's RSS after imports: weights + KV + activations (same weights on both)."""
    m = row.get("memory")
    return m["peak_rss_bytes"] - m["rss_after_imports_bytes"] if m else math.nan


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    s = result["summary"]
    out = [
        {
            "target": f"varied ≥ {VARIED_VS_HF_BATCHED:g}× HF batched best",
            "value": s["varied"]["ratio_vs_hf_batched"],
            "goal": VARIED_VS_HF_BATCHED,
        },
        {
            "target": f"varied ≥ {VARIED_VS_HF_SINGLE:g}× HF one-at-a-time",
            "value": s["varied"]["ratio_vs_hf_single"],
            "goal": VARIED_VS_HF_SINGLE,
        },
        {
            "target": f"fixed ≥ {FIXED_VS_HF_BATCHED:g}× HF batched best",
            "value": s["fixed"]["ratio_vs_hf_batched"],
            "goal": FIXED_VS_HF_BATCHED,
        },
    ]
    for p in result["limits"].get("prefill", []):
        out.append(
            {
                "target": f"prefill {p['num_prompts']}×{p['prompt_tokens']} ≥ 60% of GEMM",
                "value": p["fraction_of_gemm"],
                "goal": PREFILL_OF_GEMM,
            }
        )
    for name in ("fixed", "varied"):
        pd_mem = s[name]["pdserve_peak_above_imports_bytes"]
        hf_mem = s[name]["hf_batched_best_peak_above_imports_bytes"]
        out.append(
            {
                "target": f"{name}: peak memory below HF batched best (HF / pdserve)",
                "value": hf_mem / pd_mem if pd_mem else math.nan,
                "goal": 1.0,
            }
        )
    for t in out:
        t["met"] = None if t["value"] is None or math.isnan(t["value"]) else bool(t["value"] >= t["goal"])
    return out


def _mem(row: dict[str, Any]) -> str:
    m = row.get("memory")
    if not m:
        return f"{'-':>22}"
    peak = m["peak_rss_bytes"]
    return (
        f"{peak / MIB:>7.0f}{(peak - m['rss_after_load_bytes']) / MIB:>7.0f}"
        f"{(peak - m['rss_after_imports_bytes']) / MIB:>8.0f}"
    )


def _row(workload: str, system: str, config: str, row: dict[str, Any], pd_rate: float) -> str:
    rate = row.get("output_tokens_per_s", math.nan)
    return (
        f"{workload:<8}{system:<20}{config:<28}{rate:>8.1f}{row.get('wall_s', math.nan):>8.1f}"
        f"{_mem(row)}{pd_rate / rate if rate == rate else math.nan:>9.2f}"
    )


def _is(row: dict[str, Any], cfg: dict[str, Any] | None) -> bool:
    return cfg is not None and (row["batch_size"], row["order"]) == (cfg["batch_size"], cfg["order"])


def print_throughput(result: dict[str, Any]) -> None:
    s, cfg = result["summary"], result["config"]
    print(
        "\nS1 engine throughput — bench-50m fp32 on CPU, greedy, EOS ignored; "
        f"torch threads {result['pdserve']['fixed'].get('torch_threads')}"
    )
    print(
        f"varied: 128 requests, {cfg['varied_distribution']}\n  "
        f"({cfg['varied_totals']['prompt_tokens']} prompt / {cfg['varied_totals']['output_tokens']} output "
        "tokens)\n"
    )
    print(
        f"{'workload':<8}{'system':<20}{'config':<28}{'tok/s':>8}{'wall s':>8}"
        f"{'peak MiB: all >load >imp':>22}{'pdserve×':>9}"
    )
    sections = {
        "fixed": result["hf_batched_fixed"],
        "varied": result["hf_batched_varied_order_check"] + result["hf_batched_varied"],
    }
    for name, hf_rows in sections.items():
        pd = result["pdserve"][name]
        pd_rate = s[name]["pdserve_tokens_per_s"]
        best = s[name]["hf_batched_best_config"]
        print(_row(name, "pdserve", f"defaults, {pd.get('num_steps', '?')} steps", pd, pd_rate))
        for r in hf_rows:
            is_best = _is(r, best) and not r["note"].startswith("first")
            conf = f"B={r['batch_size']} {r['order']}" + (f", {r['note']}" if r["note"] else "")
            print(_row(name, "HF batched" + (" (best)" if is_best else ""), conf, r, pd_rate))
        single = result["hf_single"][name]
        print(
            _row(
                name, "HF one-at-a-time", f"first {single.get('num_requests', '?')} requests", single, pd_rate
            )
        )
        for ref in ("hf_single", "hf_batched"):
            p = s[name][f"parity_vs_{ref}"]
            diffs = [
                f"#{r['request']}@{r['first_difference']}"
                for r in p["requests"]
                if r["first_difference"] is not None
            ]
            print(
                f"{'':<8}parity vs {ref}: {p['num_identical']}/{p['num_checked']} requests token-identical"
                + (f"; first differences (request@token): {', '.join(diffs)}" if diffs else "")
            )
        print()
    print(
        "pdserve×: pdserve's tok/s / this row's. peak MiB: ru_maxrss of the system's own process; >load:\n"
        "minus its RSS once the model (pdserve: the engine) was built; >imp: minus its RSS after imports,\n"
        "i.e. weights + KV + activations (the memory target compares this one). Fixed B<64: timed on one\n"
        "batch (all batches of the fixed workload are the same). Varied order check: first requests, B=8.\n"
    )


def print_limits(limits: dict[str, Any]) -> None:
    if "prefill" not in limits:
        print(f"limits: {limits.get('error')}\n")
        return
    bw = limits["bandwidth"]
    print(
        "prefill: one engine step of T fresh prompt tokens vs torch GEMM of the same shapes "
        "(best of N, interleaved)"
    )
    print(
        f"{'prompts×tokens':<16}{'step ms':>9}{'tok/s':>9}{'GFLOP/s':>9}{'GEMM ms':>9}{'GEMM GF/s':>10}"
        f"{'of GEMM':>9}"
    )
    for p in limits["prefill"]:
        case = f"{p['num_prompts']}×{p['prompt_tokens']}"
        print(
            f"{case:<16}{p['step_s'] * 1e3:>9.1f}{p['tokens_per_s']:>9.0f}"
            f"{p['achieved_gflops']:>9.1f}{p['gemm_s'] * 1e3:>9.1f}{p['gemm_gflops']:>10.1f}"
            f"{p['fraction_of_gemm']:>9.0%}"
        )
    print(
        "GFLOP/s: (2 × linear params × T + LM head on sampled rows + causal attention) / step time;\n"
        "of GEMM: that rate / the GEMM's rate on its own FLOPs.\n"
    )
    print(
        f"memory read bandwidth (best of torch sum, 1 and 2 threads): {bw['read_gbps']:.1f} GB/s; "
        f"copy {bw['copy_gbps']:.1f} GB/s"
    )
    print(
        "decode: step (prompt 256, median and best) vs bounds: weights / bandwidth, (weights + KV) /\n"
        "bandwidth, torch GEMM of the same shapes (LM head on every row)"
    )
    print(
        f"{'batch':<7}{'median ms':>10}{'best ms':>9}{'weights ms':>11}{'+KV ms':>8}{'GEMM ms':>9}"
        f"{'median/bound':>13}"
    )
    for d in limits["decode"]:
        bound = max(d["weight_kv_bound_s"], d["gemm_s"])
        print(
            f"{d['batch']:<7}{d['step_s'] * 1e3:>10.1f}{d['min_step_s'] * 1e3:>9.1f}"
            f"{d['weight_bound_s'] * 1e3:>11.1f}{d['weight_kv_bound_s'] * 1e3:>8.1f}{d['gemm_s'] * 1e3:>9.1f}"
            f"{d['step_s'] / bound:>13.2f}"
        )
    print("bound = max((weights + KV bytes) / read bandwidth, GEMM time)\n")


def print_report(result: dict[str, Any]) -> None:
    print_throughput(result)
    print_limits(result["limits"])
    print("targets:")
    for t in result["targets"]:
        verdict = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        print(f"  {t['target']:<56}{t['value']:>8.2f} (goal {t['goal']:g})  {verdict}")
    before, after = result["machine"]["load_avg_before"][0], result["machine"]["load_avg_1_5_15min"][0]
    print(f"\nload average (1 min) before / after: {before:.2f} / {after:.2f}")
