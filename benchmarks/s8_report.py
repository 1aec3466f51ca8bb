"""S8's report: the S8 section of ``docs/cost.md`` and the profile summaries a result file keeps.

``benchmarks/s8_sim_fidelity.py`` writes the result file; this renders it
(``python benchmarks/s8_sim_fidelity.py --render-only`` re-renders the file
of record).
"""

from __future__ import annotations

from typing import Any

import s8_steps
from common import REPO_ROOT

from pdserve.sim.profile import Profile
from pdserve.sim.step_model import StepShape

DOC = REPO_ROOT / "docs" / "cost.md"
DOC_START, DOC_END = "<!-- s8:start -->", "<!-- s8:end -->"
METRICS = ("ttft_ms_p50", "ttft_ms_p90", "tpot_ms_p50", "tpot_ms_p90")
# a one-row decode step at a chat-sized context: the figure a reader compares profiles by
PROBE_SHAPE = StepShape(num_tokens=1, num_prefill_tokens=0, num_decode_seqs=1, prefill_pairs=0.0,
                        decode_context=512, prefill_context=0, num_sampled=1)


def profile_summary(p: Profile, reused: bool = False, file: str | None = None,
                    taken_at_s: float | None = None) -> dict[str, Any]:
    """What the result file keeps of one profile (the full profile is its own file)."""
    return {"fit": p.fit, "coefficients_s": p.step_model.to_json(),
            "serving_overhead": p.serving.to_json() if p.serving else None,
            "serving_overhead_handoff": p.serving_handoff.to_json() if p.serving_handoff else None,
            "links": {k: vars(v) for k, v in p.links.items()}, "machine": p.machine, "reused": reused,
            "file": file, "taken_at_s": taken_at_s,
            "decode_1row_ms": round(p.step_model.step_time_s(PROBE_SHAPE) * 1e3, 3)}


def _profile_rows(profiles: dict[str, Any]) -> list[str]:
    lines = ["| profile | fit error median, p90 (step shapes) | one-row decode step at context 512 "
             "| serving overhead: before the first token (under load); per token; per further row |",
             "|---|---|---|---|"]
    for key, p in profiles.items():
        fit, so = p["fit"], p.get("serving_overhead")
        serving = "not measured"
        if so:
            loaded = so.get("first_token_loaded_s")
            serving = (f"{so['first_token_s'] * 1e3:.1f} ms"
                       + (f" ({loaded * 1e3:.1f} ms)" if loaded is not None else "")
                       + f"; {so['per_token_s'] * 1e3:.2f} ms; {so.get('per_row_s', 0.0) * 1e3:.2f} ms")
        decode = f"{p['decode_1row_ms']:.2f} ms" if p.get("decode_1row_ms") is not None else "—"
        lines.append(f"| {key.replace('_', ' ')} | {fit['median_abs_rel_error']:.0%}, "
                     f"{fit['p90_abs_rel_error']:.0%} ({fit['num_samples']}) | {decode} | {serving} |")
    return lines


def render_doc(out: dict[str, Any]) -> str:
    """The S8 section of docs/cost.md, from a result file's content."""
    m = out["machine"]
    each = out.get("settings", {}).get("profile_each", "run")
    lines = [f"`{m.get('command') or 'python benchmarks/s8_sim_fidelity.py'}` on {m['date'][:10]} "
             f"(commit {str(m['git']['commit'])[:7]}), {m['cpu_model']} × {m['cpu_count']}, load average "
             f"{m['load_avg_1_5_15min'][0]:.1f} at the start and {out['load_avg_at_end'][0]:.1f} at the end "
             "(a machine shared with other developers' jobs: the measured runs and the profile ran under "
             "that load).", "",
             {"run": "Profiles: one per thread count, taken at the start of the run.",
              "config": "Profiles: one taken right before each configuration was launched.",
              "cell": "Profiles: one taken right before each cell (configuration and rate) was launched; "
                      "each cell is simulated from its own."}[each], ""]
    lines += _profile_rows(out["profiles"])
    if not out["cells"]:
        lines += ["", "**The measured half did not run** in this result file "
                  f"(configurations done: {', '.join(out.get('configs_done', [])) or 'none'}): "
                  "no simulated vs measured comparison is available from it."]
    lines += ["", "| config | rate (req/s) | TTFT p50 meas → sim | TTFT p90 | TPOT p50 | TPOT p90 "
              "| attainment meas / sim |", "|---|---|---|---|---|---|---|"]

    def cell(v: dict[str, Any]) -> str:
        mark = "" if v["pass"] else " ✗"
        return f"{v['measured']:.0f} → {v['simulated']:.0f} ms ({v['error']:+.0%}){mark}"

    for c in out["cells"]:
        a = c["attainment"]
        parts = " | ".join(cell(c[k]) for k in METRICS)
        lines.append(f"| {c['config']} | {c['rate_per_s']:g} | {parts} | {a['measured']:.0%} / "
                     f"{a['simulated']:.0%} |")
    lines += ["", "Within target (p50 ±15%, p90 ±25%; ✗ marks a miss): "
              + ", ".join(f"{k} {v}" for k, v in out["passed"].items()) + ".", ""]
    lines += s8_steps.speed_table(out["cells"], METRICS)
    for r in out["speed"]:
        line = (f"- speed: {r['num_requests']:,} chat requests on {r['deployment']} "
                f"({r['num_steps']:,} engine steps, {r['simulated_s']:.0f} s simulated): "
                f"{r['wall_s']:.1f} s of wall time")
        if "cpu_s" in r:
            met = "met" if r["cpu_s"] < 60 else "missed"
            line += (f", {r['cpu_s']:.1f} s of CPU time (load average {r['load_avg_1min']:.1f}: the wall "
                     f"time is mostly the other jobs'); target < 60 s {met} in CPU time")
        line += f", {'met' if r['pass'] else 'missed'} in wall time"
        lines.append(line)
    return "\n".join(lines)


def write_doc(out: dict[str, Any]) -> None:
    """Replace the S8 section of docs/cost.md."""
    text = DOC.read_text()
    head, _, rest = text.partition(DOC_START)
    _, _, tail = rest.partition(DOC_END)
    DOC.write_text(f"{head}{DOC_START}\n{render_doc(out)}\n{DOC_END}{tail}")
