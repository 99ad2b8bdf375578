#!/usr/bin/env python3
"""
Per-pair ratios of a paired run (``bench/run.sh pair_b0``): mailrelay's n-th measured run divided by
Postfix's n-th, which ran next to it, and the median of those ratios.  With ``MR_SANDBOX=1`` mailrelay's
runs are case s0 (received, not delivered: a bound, not equal work) and have no end-to-end rate.

    bench/pairs.py bench/results/raw-YYYYMMDD-HHMMSS.jsonl
    bench/pairs.py RUN1.jsonl RUN2.jsonl ...   # the pairs of several runs pooled, one median over all

Pairs are made within each file (a run's n-th mailrelay run with its n-th Postfix run), never across files.

Postfix's accepted rate swings by up to 2x between neighbouring runs while mailrelay's stays within a few
percent, so a ratio per pair, then the median, says more than the ratio of the two medians.
"""

from __future__ import annotations

import json
import statistics
import sys


def _paired(row: dict) -> bool:
    return row["anchor"] == "mailrelay" and row["case"] in ("b0", "s0")


def _pairs(rows: list[dict], size: int) -> list[tuple[dict, dict]]:
    mr = [r for r in rows if _paired(r) and int(r["size"]) == size]
    pf = [r for r in rows if (r["anchor"], r["case"], int(r["size"])) == ("postfix", "b", size)]
    return list(zip(mr, pf, strict=False))


def main(paths: list[str]) -> None:
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append([json.loads(line) for line in f])
    sizes = sorted({int(r["size"]) for rows in runs for r in rows if _paired(r)})
    print("| size | accepted ratio per pair | median | e2e ratio per pair | median | Postfix b msg/s per run |")
    print("|---|---|---|---|---|---|")
    for size in sizes:
        pairs = [pair for rows in runs for pair in _pairs(rows, size)]
        if not pairs:
            continue
        acc = [m["msgs_per_s"] / p["msgs_per_s"] for m, p in pairs]
        e2e = [
            m["e2e_msgs_per_s"] / p["e2e_msgs_per_s"]
            for m, p in pairs
            if m.get("e2e_msgs_per_s") and p.get("e2e_msgs_per_s")
        ]
        print(
            f"| {size // 1024} KB | {', '.join(f'{x:.2f}' for x in acc)} | **{statistics.median(acc):.2f}x** | "
            f"{', '.join(f'{x:.2f}' for x in e2e) or '-'} | {f'{statistics.median(e2e):.2f}x' if e2e else '-'} | "
            f"{', '.join(str(round(p['msgs_per_s'])) for _, p in pairs)} |"
        )


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: bench/pairs.py RAW.jsonl [RAW.jsonl ...]")
    main(sys.argv[1:])
