"""S2's report: the per-window lines, the pooled table, the (c)/(a) and (c)/(b) ratios, the targets.

:mod:`s2_interference` runs the configurations; this module pools the windows of
every round (:func:`pool`), prints the table and judges the targets (:func:`compare`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

from common import ratio
from s2_load import CLASSES, Samples, Window, summarize

KV_BYTES_PER_TOKEN = 2 * 8 * 4 * 64 * 4  # K and V × 8 layers × 4 KV heads × head_dim 64 × fp32
TARGETS = {  # (metric, class, baseline config, most (c)/baseline may be)
    "bg_itl_p99_vs_a": ("itl_p99_ms", "bg", "a", 0.2),
    "bg_itl_p99_vs_b": ("itl_p99_ms", "bg", "b", 0.6),
    "fg_ttft_p50_vs_b": ("ttft_p50_ms", "fg", "b", 1.3),
}
RATIO_METRICS = (("bg", "itl_p99_ms"), ("bg", "itl_p50_ms"), ("fg", "ttft_p50_ms"), ("fg", "ttft_p99_ms"))


def fmt(x: float | None, digits: int = 0) -> str:
    """A number for the table; ``-`` when missing."""
    return "-" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def print_window(w: Window) -> None:
    """The progress lines of one finished rate window."""
    for kind in CLASSES:
        s = summarize(w.samples[kind])
        print(f"    rate {w.rate_per_s:g}/s {kind}: n={s['num_sent']} TTFT p50/p99 {fmt(s['ttft_p50_ms'])}/"
              f"{fmt(s['ttft_p99_ms'])} ms, ITL p50/p99 {fmt(s['itl_p50_ms'], 1)}/"
              f"{fmt(s['itl_p99_ms'], 1)} ms, {fmt(s['tokens_per_s'], 1)} tok/s, errors {s['num_errors']}, "
              f"chunk≠token {s['num_chunk_token_mismatches']}/{s['num_finished_checked']}", flush=True)
    used = ", ".join(f"{k} {v:.2f}" for k, v in w.cpu_cores_used.items())
    print(f"    cores used: {used}; drain {w.drain_s:.1f} s", flush=True)


def pool(runs: list[list[Window]], rates: list[float]) -> list[dict[str, Any]]:
    """Per rate: the samples of every run of a configuration pooled, then summarised."""
    pooled = []
    for rate in rates:
        wins = [w for run in runs for w in run if w.rate_per_s == rate]
        classes = {
            kind: summarize(functools.reduce(Samples.merge, (w.samples[kind] for w in wins), Samples()))
            for kind in CLASSES
        }
        cpu = {k: round(sum(w.cpu_cores_used[k] for w in wins) / len(wins), 3)
               for k in wins[0].cpu_cores_used}
        pooled.append({"rate_per_s": rate, "num_runs": len(wins), "cpu_cores_used_mean": cpu, **classes})
    return pooled


def print_table(results: dict[str, dict[str, Any]]) -> None:
    """The table of every configuration, rate and class (pooled over rounds)."""
    header = (f"{'cfg':<4}{'rate/s':>7} {'class':<6}{'n':>4}{'TTFT p50':>10}{'TTFT p99':>10}"
              f"{'ITL p50':>9}{'ITL p99':>9}{'tok/s':>7}{'chk':>8}{'busy':>7}{'other':>7}")
    print("\n" + header + "\n" + "-" * len(header))
    for key, res in results.items():
        for win in res["windows"]:
            cpu = win["cpu_cores_used_mean"]
            for kind in CLASSES:
                s = win[kind]
                ok = s["num_finished_checked"] - s["num_chunk_token_mismatches"]
                print(f"{key:<4}{win['rate_per_s']:>7g} {kind:<6}{s['num_sent']:>4}"
                      f"{fmt(s['ttft_p50_ms']):>10}{fmt(s['ttft_p99_ms']):>10}"
                      f"{fmt(s['itl_p50_ms'], 1):>9}{fmt(s['itl_p99_ms'], 1):>9}"
                      f"{fmt(s['tokens_per_s'], 1):>7}{ok:>4}/{s['num_finished_checked']:<3}"
                      f"{cpu['machine']:>7.2f}{cpu['other_processes']:>7.2f}")
    print("times in ms; chk: finished requests whose chunks each carried one token and numbered "
          "usage.completion_tokens = max_tokens;\nbusy / other: cores the whole machine / processes "
          "outside this benchmark kept busy during the window (of 2)")


def compare(results: dict[str, dict[str, Any]], rates: list[float]) -> dict[str, Any]:
    """Ratios (c)/(a) and (c)/(b) per rate, and the targets at the lowest rate."""
    def metric(key: str, rate: float, kind: str, name: str) -> float:
        for win in results.get(key, {}).get("windows", []):
            if win["rate_per_s"] == rate:
                return float(win[kind][name])
        return math.nan

    ratios: dict[str, dict[str, float]] = {}
    print("\nratios (c)/(a) and (c)/(b):")
    for rate in rates:
        r = {}
        for base in ("a", "b"):
            for kind, name in RATIO_METRICS:
                r[f"{kind}_{name}_c_over_{base}"] = ratio(
                    metric("c", rate, kind, name), metric(base, rate, kind, name)
                )
        ratios[str(rate)] = r
        for base in ("a", "b"):
            print(f"  rate {rate:g}/s, (c)/({base}): " + ", ".join(
                f"{kind} {name[:-3].replace('_', ' ')} {fmt(r[f'{kind}_{name}_c_over_{base}'], 3)}"
                for kind, name in RATIO_METRICS))
    lowest = min(rates)
    verdicts: dict[str, Any] = {}
    print(f"\ntargets at the lowest rate ({lowest:g}/s):")
    for name, (m, kind, base, limit) in TARGETS.items():
        value = ratio(metric("c", lowest, kind, m), metric(base, lowest, kind, m))
        verdict = "n/a" if math.isnan(value) else "PASS" if value <= limit else "MISS"
        verdicts[name] = {"ratio": value, "limit": limit, "verdict": verdict}
        print(f"  {kind} {m[:-3].replace('_', ' ')} (c)/({base}) = {fmt(value, 3)}  "
              f"(target ≤ {limit})  {verdict}")
    return {"ratios": ratios, "targets": verdicts}


def print_workers(key: str, run: dict[str, Any], fg_prompt: int) -> None:
    """What ``/pdserve/workers`` said at the end of a configuration's last run (KV moved, tokens computed)."""
    workers = run["workers"]
    relayed = workers.get("kv_bytes_relayed")  # not in every pdserve version
    note = f": kv_bytes_relayed {relayed}" if relayed is not None else ""
    print(f"\n/pdserve/workers at the end of ({key}){note}")
    for w in workers.get("workers", []):
        s = w.get("stats") or {}
        sent, received = s.get("kv_bytes_sent", 0), s.get("kv_bytes_received", 0)
        print(f"  {w['worker_id']:<10} {w['role']:<8} prompt tokens computed "
              f"{s.get('num_prompt_tokens_computed')}, steps {s.get('num_steps')}, "
              f"KV sent {sent / 2**20:.1f} MiB, received {received / 2**20:.1f} MiB, "
              f"transfers {s.get('kv_transfers')}, transports {s.get('transports')}")
    if key == "c":
        print(f"  (KV of one {fg_prompt}-token prompt: {fg_prompt * KV_BYTES_PER_TOKEN / 2**20:.0f} MiB)")
