"""Record the throughput of the real training/pair-generation runs (from their logs) in RESULTS.md.

    python -m benchmarks.record_runs   # reads runs/*/log.jsonl and runs/pairs.log when present
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from getfast.bench.common import machine_line, markdown_table, update_results_md

ROOT = Path(__file__).resolve().parent.parent
RUNS = {"teacher-fmnist": "EDM teacher UNet-S (train step, batch 64)", "sim-fmnist": "SIM (fake + generator step, batch 16)",
        "get-fmnist": "GET-N/4 distillation (batch 32)", "vit-fmnist": "ViT-N/4 distillation (batch 32)",
        "gdd-fmnist": "GDD (D + G step, batch 16)", "gddi-fmnist": "GDD-I (D + G step, batch 16)"}


def main():
    rows = []
    for run, label in RUNS.items():
        log = ROOT / "runs" / run / "log.jsonl"
        if not log.exists():
            continue
        recs = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
        rates = sorted(r["img_per_s"] for r in recs[1:])
        rows.append([label, f"{rates[len(rates) // 2]:.1f}", f"{recs[-1]['kimg']:.1f}"])
    pairs = ROOT / "runs" / "pairs.log"
    body = [f"Machine: {machine_line()} (1 torch thread per process; the machine was shared with test runs).\n",
            markdown_table(["run", "median img/s", "kimg"], rows)]
    if pairs.exists():
        per = [float(m.group(1)) for m in re.finditer(r"([\d.]+) pairs/s", pairs.read_text())]
        if per:
            body.append(f"\nPair generation (`make-pairs`, Heun 18 steps = 35 evaluations, 2 ranks × 1 thread under "
                        f"torchrun): {sum(per) / len(per):.2f} pairs/s per rank over {len(per)} shards of 250, "
                        f"≈{2 * sum(per) / len(per):.1f} pairs/s total for 3,000 pairs.")
    update_results_md("runs", "\n".join(body), title="runs — throughput of the real Fashion-MNIST runs")


if __name__ == "__main__":
    main()
