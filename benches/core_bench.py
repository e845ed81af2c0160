"""Run the criterion benches of the Rust core and record them under benches/results.

python benches/core_bench.py            # runs `cargo bench --bench scheduler`, then records
python benches/core_bench.py --no-run   # only records what target/criterion holds
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_meta import ROOT, write_result

TARGET_US = 50.0  # DESIGN.md: schedule + commit at 256 sequences


def collect() -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for bench in sorted((ROOT / "target" / "criterion").glob("**/new/benchmark.json")):
        meta = json.loads(bench.read_text())
        est = json.loads((bench.parent / "estimates.json").read_text())
        out[meta["full_id"]] = {
            "median_ns": est["median"]["point_estimate"],
            "median_ci_ns": [
                est["median"]["confidence_interval"]["lower_bound"],
                est["median"]["confidence_interval"]["upper_bound"],
            ],
            "mean_ns": est["mean"]["point_estimate"],
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-run", action="store_true", help="record existing criterion output")
    args = ap.parse_args()
    if not args.no_run:
        subprocess.run(
            ["cargo", "bench", "-p", "alora-benches", "--bench", "scheduler"], cwd=ROOT, check=True
        )
    results = collect()
    if not results:
        print("no criterion results found under target/criterion", file=sys.stderr)
        return 1
    print(f"{'bench':40s} {'median':>12s}")
    for name, r in results.items():
        print(f"{name:40s} {r['median_ns'] / 1000:10.2f} us")
    step = results.get("schedule_commit/256", {}).get("median_ns")
    verdict = None if step is None else step / 1000 < TARGET_US
    if step is not None:
        print(
            f"schedule+commit @256 seqs: {step / 1000:.1f} us (target < {TARGET_US} us): "
            f"{'met' if verdict else 'MISSED'}"
        )
    path = write_result(
        "core_scheduler",
        {"benches": results, "target_schedule_commit_256_us": TARGET_US, "target_met": verdict},
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
