"""S1 — engine throughput (offline): pdserve ``LLM.generate`` vs Hugging Face ``generate``.

Model ``bench-50m`` (fp32, CPU, torch's default threads), greedy, EOS ignored.
HF runs the very same weights (``save_hf_checkpoint``). Workloads (prompts are
random token ids, seeded):

- fixed: 64 requests, prompt 256, output 128;
- varied: 128 requests, prompt length ``clip(round(LogNormal(ln 200, 0.8)), 16,
  1024)`` (median 200) and output length ``clip(round(LogNormal(ln 128, 0.8)),
  8, 512)`` (median 128), drawn independently with ``random.Random(seed)``.

Systems, each in its own process (so that peak RSS is its own), one after the
other (see :mod:`s1_systems`):

1. pdserve, all requests in one ``generate`` call, default engine options.
2. HF batched: left-padded batches; a batch runs to its longest output
   (``generate`` takes one ``max_new_tokens``) and only each request's own
   tokens count. Fixed workload: batch sizes 8/16/32/64 (``--hf-batch-sizes``);
   every batch is the same, so each size is timed on one batch (64: the whole
   workload). Varied workload: arrival order vs sorted by output length (what
   a user who knows each request's max_tokens does: it cuts the padding of
   decode steps) is compared on its first ``--order-requests`` requests at
   batch size 8; the better order then runs the whole workload at each of
   ``--varied-batch-sizes`` (16/32/64; 8 is slower on the fixed sweep and its
   runs cost most). "HF batched" is the best full run.
3. HF one request at a time: a rate, measured on the first requests of each
   workload (``--single-fixed`` / ``--single-varied``).

Parity: pdserve's tokens against HF one-at-a-time (no padding: the exact
reference) and against HF batched, request by request.

Also: pdserve's prefill against torch GEMM of the same shapes, and its decode
step against the weight-bytes / bandwidth bound (:mod:`s1_limits`).

    python benchmarks/s1_engine_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, machine_info, ratio, write_json
from s1_report import mem_above_imports, print_report, targets

HERE = Path(__file__).resolve().parent
RESULT_PATH = RESULTS_DIR / "s1_engine_throughput.json"
VOCAB_LOW, VOCAB_HIGH = 300, 32000  # ordinary token ids of bench-50m (no pad/BOS/EOS)


def make_workloads(seed: int, num_fixed: int = 64, num_varied: int = 128) -> dict[str, dict[str, Any]]:
    rng = random.Random(seed)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(n)]

    def lognormal(median: float, lo: int, hi: int) -> int:
        return min(max(round(rng.lognormvariate(math.log(median), 0.8)), lo), hi)

    fixed = {"prompts": [prompt(256) for _ in range(num_fixed)], "output_lens": [128] * num_fixed}
    lens = [(lognormal(200, 16, 1024), lognormal(128, 8, 512)) for _ in range(num_varied)]
    varied = {"prompts": [prompt(p) for p, _ in lens], "output_lens": [o for _, o in lens]}
    return {"fixed": fixed, "varied": varied}


def subset(workload: dict[str, Any], num: int) -> dict[str, Any]:
    return {"prompts": workload["prompts"][:num], "output_lens": workload["output_lens"][:num]}


class Runner:
    """Runs each system in a fresh ``s1_systems.py`` process and keeps its result."""

    def __init__(self, tmp: Path, timeout_s: float) -> None:
        self.tmp = tmp
        self.timeout_s = timeout_s
        self.start = time.monotonic()
        self.count = 0

    def __call__(self, label: str, spec: dict[str, Any]) -> dict[str, Any]:
        self.count += 1
        spec_path, out_path = self.tmp / f"spec{self.count}.json", self.tmp / f"out{self.count}.json"
        spec_path.write_text(json.dumps(spec))
        began = time.monotonic()
        try:
            subprocess.run(
                [sys.executable, str(HERE / "s1_systems.py"), str(spec_path), str(out_path)],
                check=True,
                timeout=self.timeout_s,
            )
            result = json.loads(out_path.read_text())
        except (subprocess.SubprocessError, OSError) as e:
            result = {"error": str(e)}
        result["label"] = label
        print(
            f"[{time.monotonic() - self.start:6.0f}s] {label}: "
            + (
                f"{result['output_tokens_per_s']:.1f} tok/s"
                if "output_tokens_per_s" in result
                else result.get("error", "done")
            )
            + f" ({time.monotonic() - began:.0f}s)",
            file=sys.stderr,
            flush=True,
        )
        return result


def hf_batched(
    run: Runner,
    ckpt: str,
    name: str,
    workload: dict[str, Any],
    size: int,
    order: str,
    num_batches: int | None = None,
    note: str = "",
) -> dict[str, Any]:
    spec = {
        "system": "hf_batched",
        "ckpt": ckpt,
        **workload,
        "batch_size": size,
        "order": order,
        "num_batches": num_batches,
    }
    result = run(f"HF batched {name} B={size} {order}{note}", spec)
    return {
        "workload": name,
        "batch_size": size,
        "order": order,
        "num_batches_timed": num_batches,
        "num_requests_given": len(workload["prompts"]),
        "note": note.strip(" ,"),
        **result,
    }


def best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [r for r in rows if "output_tokens_per_s" in r]
    return max(ok, key=lambda r: r["output_tokens_per_s"]) if ok else None


def parity(reference: dict[str, list[int]], tokens: list[list[int]]) -> dict[str, Any]:
    """How many of the reference's requests pdserve reproduced token for token."""
    rows = []
    for key, ref in sorted(reference.items(), key=lambda kv: int(kv[0])):
        got = tokens[int(key)]
        first_diff = next((i for i, (a, b) in enumerate(zip(ref, got, strict=True)) if a != b), None)
        rows.append({"request": int(key), "num_tokens": len(ref), "first_difference": first_diff})
    return {
        "num_identical": sum(r["first_difference"] is None for r in rows),
        "num_checked": len(rows),
        "requests": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller run: fewer sweep points and requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64], help="fixed sweep")
    ap.add_argument("--order-requests", type=int, default=16, help="varied requests of the order check")
    ap.add_argument("--varied-batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--single-fixed", type=int, default=4, help="fixed requests HF runs one at a time")
    ap.add_argument("--single-varied", type=int, default=12, help="varied requests HF runs one at a time")
    ap.add_argument("--timeout-s", type=float, default=900.0, help="per system")
    ap.add_argument("--out", type=Path, default=RESULT_PATH)
    args = ap.parse_args()
    if args.quick:
        args.hf_batch_sizes, args.order_requests, args.varied_batch_sizes = [16, 64], 8, [32]
        args.single_fixed, args.single_varied = 2, 6

    from pdserve.model.loader import save_hf_checkpoint

    load_before = machine_info()["load_avg_1_5_15min"]
    workloads = make_workloads(args.seed)
    fixed, varied = workloads["fixed"], workloads["varied"]
    with tempfile.TemporaryDirectory(prefix="s1_") as tmp_name:
        tmp = Path(tmp_name)
        ckpt = str(tmp / "bench-50m-hf")
        save_hf_checkpoint("bench-50m", ckpt, seed=0)
        run = Runner(tmp, args.timeout_s)
        limits = run("limits (prefill vs GEMM, decode vs bandwidth)", {"system": "limits"})
        pd = {name: run(f"pdserve {name}", {"system": "pdserve", **w}) for name, w in workloads.items()}

        num_fixed = len(fixed["prompts"])
        sweep = [
            hf_batched(
                run,
                ckpt,
                "fixed",
                fixed,
                size,
                "arrival",
                1 if size < num_fixed else None,
                ", one batch" if size < num_fixed else "",
            )
            for size in args.hf_batch_sizes
        ]
        order_check = [
            hf_batched(
                run,
                ckpt,
                "varied",
                subset(varied, args.order_requests),
                8,
                order,
                note=f", first {args.order_requests}",
            )
            for order in ("arrival", "sorted")
        ]
        best_order = best(order_check)
        order = best_order["order"] if best_order else "sorted"
        varied_full = [
            hf_batched(run, ckpt, "varied", varied, size, order) for size in args.varied_batch_sizes
        ]
        single = {
            "fixed": run(
                f"HF one-at-a-time fixed (first {args.single_fixed})",
                {"system": "hf_single", "ckpt": ckpt, **subset(fixed, args.single_fixed)},
            ),
            "varied": run(
                f"HF one-at-a-time varied (first {args.single_varied})",
                {"system": "hf_single", "ckpt": ckpt, **subset(varied, args.single_varied)},
            ),
        }

    hf_best = {"fixed": best(sweep), "varied": best(varied_full)}
    summary: dict[str, Any] = {}
    for name in workloads:
        pd_rate = pd[name].get("output_tokens_per_s", math.nan)
        b, s = hf_best[name], single[name]
        summary[name] = {
            "pdserve_tokens_per_s": pd_rate,
            "hf_batched_best_tokens_per_s": b["output_tokens_per_s"] if b else math.nan,
            "hf_batched_best_config": {"batch_size": b["batch_size"], "order": b["order"]} if b else None,
            "hf_single_tokens_per_s": s.get("output_tokens_per_s", math.nan),
            "ratio_vs_hf_batched": ratio(pd_rate, b["output_tokens_per_s"]) if b else math.nan,
            "ratio_vs_hf_single": ratio(pd_rate, s.get("output_tokens_per_s", math.nan)),
            "parity_vs_hf_single": parity(
                s.get("parity_token_ids", {}), pd[name].get("parity_token_ids", [])
            ),
            "parity_vs_hf_batched": parity(
                b.get("parity_token_ids", {}) if b else {}, pd[name].get("parity_token_ids", [])
            ),
            "pdserve_peak_above_imports_bytes": mem_above_imports(pd[name]),
            "hf_batched_best_peak_above_imports_bytes": mem_above_imports(b) if b else math.nan,
        }
    config = {
        "model": "bench-50m",
        "dtype": "float32",
        "seed": args.seed,
        "command": " ".join(sys.argv),
        "varied_distribution": "prompt clip(round(LogNormal(ln 200, 0.8)), 16, 1024); "
        "output clip(round(LogNormal(ln 128, 0.8)), 8, 512)",
        "varied_totals": {
            "prompt_tokens": sum(len(p) for p in varied["prompts"]),
            "output_tokens": sum(varied["output_lens"]),
        },
        **{k: v for k, v in vars(args).items() if k != "out"},
    }
    result = {
        "scenario": "S1",
        "machine": {**machine_info(), "load_avg_before": load_before},
        "config": config,
        "summary": summary,
        "pdserve": pd,
        "hf_batched_fixed": sweep,
        "hf_batched_varied_order_check": order_check,
        "hf_batched_varied": varied_full,
        "hf_single": single,
        "limits": limits,
    }
    result["targets"] = targets(result)
    print_report(result)
    print(f"wrote {write_json(args.out, result)}")


if __name__ == "__main__":
    main()
