"""The soak test's report: growth and slopes per process, the flags (SUSPECT), the tables.

:func:`summarize` turns the samples of a run into the result file's summary (growth first
→ last and warm-up → last, least-squares slopes, leaked blocks, errors) and
:func:`print_table` / :func:`print_summary` print them.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from soak_load import LoadCounters


def slope_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (t_s, value) in value per minute; None with fewer than 3 points."""
    if len(points) < 3:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return 60 * sum((t - mt) * (v - mv) for t, v in points) / var if var else None


def summarize(run: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Growth per process, KV peaks, counters and the list of what is suspect."""
    samples = run["samples"]
    first, last = samples[0], samples[-1]
    base = next((s for s in samples if s["phase"] != "warmup"), first)
    steady = [s for s in samples if s["phase"] == "load"]
    procs: dict[str, Any] = {}
    suspects: list[str] = []
    for name in first["procs"]:
        p0, pb, p1 = first["procs"][name], base["procs"].get(name), last["procs"].get(name)
        if not (p0 and pb and p1):
            procs[name] = None
            continue
        g = {
            "rss_first_mib": p0["rss_mib"], "rss_last_mib": p1["rss_mib"],
            "rss_max_mib": max(s["procs"][name]["rss_mib"] for s in samples if s["procs"].get(name)),
            "rss_growth_mib": p1["rss_mib"] - p0["rss_mib"],
            "rss_growth_after_warmup_mib": p1["rss_mib"] - pb["rss_mib"],
            "anon_growth_after_warmup_mib": p1.get("anon_mib", 0.0) - pb.get("anon_mib", 0.0),
            "shmem_growth_after_warmup_mib": p1.get("shmem_mib", 0.0) - pb.get("shmem_mib", 0.0),
            "rss_slope_mib_per_min": slope_per_min(
                [(s["t_s"], s["procs"][name]["rss_mib"]) for s in steady if s["procs"].get(name)]
            ),
            "fds_first": p0["num_fds"], "fds_last": p1["num_fds"],
            "fd_growth": p1["num_fds"] - p0["num_fds"],
            "fd_growth_after_warmup": p1["num_fds"] - pb["num_fds"],
            "threads_first": p0["num_threads"], "threads_last": p1["num_threads"],
            "thread_growth_after_warmup": p1["num_threads"] - pb["num_threads"],
        }
        procs[name] = g
        if g["rss_growth_after_warmup_mib"] > args.rss_threshold_mib:
            suspects.append(f"{name}: RSS {g['rss_growth_after_warmup_mib']:+.1f} MiB after warm-up "
                            f"(threshold {args.rss_threshold_mib:g})")
        if g["fd_growth_after_warmup"] > args.fd_threshold:
            suspects.append(f"{name}: {g['fd_growth_after_warmup']:+.0f} fds after warm-up "
                            f"(threshold {args.fd_threshold})")
        if g["thread_growth_after_warmup"] > args.thread_threshold:
            suspects.append(f"{name}: {g['thread_growth_after_warmup']:+.0f} threads after warm-up "
                            f"(threshold {args.thread_threshold})")
    workers = sorted({w for s in samples for w in s["workers"]})
    kv = {
        w: {
            "max_used_blocks": max((s["workers"][w]["used_blocks"] for s in samples if s["workers"].get(w)),
                                   default=None),
            "max_held": max((s["workers"][w]["held"] for s in samples if s["workers"].get(w)), default=None),
            "num_unanswered_samples": sum(1 for s in samples if s["workers"].get(w) is None),
        }
        for w in workers
    }
    quiesce = run["quiesce"]
    leaked = {
        w: {k: v[k] for k in ("used_blocks", "held", "running", "waiting")}
        for w, v in quiesce["workers"].items()
        if v and (v["used_blocks"] or v["held"] or v["running"] or v["waiting"])
    }
    if not quiesce["idle"]:
        what = ", ".join(f"{w} {v}" for w, v in leaked.items()) or "a worker did not answer"
        suspects.append(f"LEAK: not idle {args.idle_timeout:g} s after the load stopped: {what}; "
                        f"router in flight {quiesce['router_inflight']}")
    c: LoadCounters = run["counters"]
    if c.num_errors:
        suspects.append(f"{c.num_errors} requests failed: {dict(c.error_kinds.most_common(3))}")
    if c.num_cancelled:
        suspects.append(f"{c.num_cancelled} requests still running {args.stop_timeout:g} s after the stop")
    for name, code in run["exited"].items():
        suspects.append(f"{name} exited with code {code} during the run")
    load_s = (steady[-1]["t_s"] - base["t_s"]) if steady else 0.0
    completed_in_load = (steady[-1]["num_completed"] - base["num_completed"]) if steady else 0
    tokens_in_load = (steady[-1]["num_completion_tokens"] - base["num_completion_tokens"]) if steady else 0
    return {
        "procs": procs, "kv": kv, "leaked": leaked, "quiesce": quiesce, "suspects": suspects,
        "counters": {**{k: v for k, v in asdict(c).items() if k != "error_kinds"},
                     "error_kinds": dict(c.error_kinds)},
        "requests_per_s_after_warmup": completed_in_load / load_s if load_s else None,
        "tokens_per_s_after_warmup": tokens_in_load / load_s if load_s else None,
        "stop_s": run["stop_s"],
    }


def fmt(x: float | None, spec: str = ".1f") -> str:
    """A number for the tables; ``-`` when missing."""
    return "-" if x is None else format(x, spec)


def print_table(samples: list[dict[str, Any]]) -> None:
    """One row per sample: phase, load counters, RSS/fds/threads per process, KV blocks per worker."""
    workers = sorted({w for s in samples for w in s["workers"]})
    procs = list(samples[0]["procs"])
    head = f"{'t_s':>6} {'phase':<8}{'done':>6}{'err':>5}{'abrt':>5}{'req/s':>7}{'tok/s':>7}"
    head += "".join(f"{w + ' kv':>14}" for w in workers)
    head += "".join(f"{p + ' MiB/fd/thr':>23}" for p in procs)
    print(head + "\n" + "-" * len(head))
    for s in samples:
        row = (f"{s['t_s']:>6.0f} {s['phase']:<8}{s['num_completed']:>6}{s['num_errors']:>5}"
               f"{s['num_aborted']:>5}{fmt(s['requests_per_s']):>7}{fmt(s['tokens_per_s'], '.0f'):>7}")
        for w in workers:
            v = s["workers"].get(w)
            row += f"{(str(v['used_blocks']) + '/' + str(v['held'])) if v else '-':>14}"
        for p in procs:
            v = s["procs"].get(p)
            cell = f"{v['rss_mib']:.1f}/{v['num_fds']:.0f}/{v['num_threads']:.0f}" if v else "gone"
            row += f"{cell:>23}"
        print(row)
    print("(kv: blocks used/requests held; done: completed requests, cumulative)")


def print_summary(summary: dict[str, Any], args: argparse.Namespace) -> None:
    """Growth per process, quiesce, errors and the SUSPECT flags of the summary."""
    print(f"\n{'process':<12}{'RSS first':>10}{'last':>9}{'growth':>9}{'after wu':>9}{'anon wu':>9}"
          f"{'shm wu':>8}{'MiB/min':>9}{'fds':>10}{'fd wu':>7}{'thr':>8}")
    for name, g in summary["procs"].items():
        if g is None:
            print(f"{name:<12} (no samples: the process was gone)")
            continue
        flag = ("  SUSPECT" if g["rss_growth_after_warmup_mib"] > args.rss_threshold_mib
                or g["fd_growth_after_warmup"] > args.fd_threshold
                or g["thread_growth_after_warmup"] > args.thread_threshold else "")
        print(f"{name:<12}{g['rss_first_mib']:>10.1f}{g['rss_last_mib']:>9.1f}{g['rss_growth_mib']:>+9.1f}"
              f"{g['rss_growth_after_warmup_mib']:>+9.1f}{g['anon_growth_after_warmup_mib']:>+9.1f}"
              f"{g['shmem_growth_after_warmup_mib']:>+8.1f}{fmt(g['rss_slope_mib_per_min'], '+.2f'):>9}"
              f"{g['fds_first']:>5.0f}→{g['fds_last']:<4.0f}{g['fd_growth_after_warmup']:>+7.0f}"
              f"{g['threads_first']:>4.0f}→{g['threads_last']:<3.0f}{flag}")
    print("(MiB; 'wu': from the first sample after --warmup to the last sample; MiB/min: slope under load)")
    for w, k in summary["kv"].items():
        print(f"{w}: max KV blocks used {k['max_used_blocks']}, max held {k['max_held']}, "
              f"samples without stats {k['num_unanswered_samples']}")
    c, q = summary["counters"], summary["quiesce"]
    print(f"requests: sent {c['num_sent']}, completed {c['num_completed']}, errors {c['num_errors']}, "
          f"aborted by the client {c['num_aborted']}, cancelled at the stop {c['num_cancelled']}; "
          f"{fmt(summary['requests_per_s_after_warmup'], '.2f')} req/s, "
          f"{fmt(summary['tokens_per_s_after_warmup'], '.0f')} tok/s after warm-up")
    if q["idle"]:
        print(f"quiesce: every worker at 0 blocks used / 0 held {q['after_s']:.1f} s after the load "
              f"stopped ({summary['stop_s']:.1f} s to finish the requests in flight); leaked blocks 0")
    else:
        leaked_blocks = sum(v["used_blocks"] for v in summary["leaked"].values())
        print(f"quiesce: NOT idle after {q['after_s']:.1f} s; leaked blocks {leaked_blocks}, "
              f"{summary['leaked']}")
    if summary["suspects"]:
        print("\nSUSPECT:")
        for s in summary["suspects"]:
            print(f"  - {s}")
    else:
        print(f"\nOK: nothing grew past RSS +{args.rss_threshold_mib:g} MiB / +{args.fd_threshold} fds / "
              f"+{args.thread_threshold} threads after warm-up, no errors, no leaked blocks")
