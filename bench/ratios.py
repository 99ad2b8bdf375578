#!/usr/bin/env python3
"""
mailrelay's rates as ratios to each peer measured in the same run.

Reads raw JSON-lines files written by run_anchors.sh (one line per run) and prints, per case and
message size, the medians of accepted msg/s, p50/p99 latency and end-to-end delivered msg/s, with
mailrelay / peer ratios.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict

PEERS = ("postfix", "haraka")


def main(paths: list[str]) -> None:
    cells: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for path in paths:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                cells[(r["anchor"], r["case"], int(r.get("size", 0)))].append(r)

    def med(rows: list[dict], key: str, sub: str | None = None) -> float | None:
        values = [(r.get(key) or {}).get(sub) if sub else r.get(key) for r in rows]
        values = [v for v in values if isinstance(v, int | float)]
        return round(statistics.median(values), 1) if values else None

    # Which of the peers' cases each mailrelay case is compared with:
    # b  STARTTLS + AUTH; mailrelay signs every copy (DKIM), so also against the peers' c (+ DKIM);
    # b0 the same with mailrelay's signing off for the domain: the same work as the peers' b;
    # t  the HTML load (bench/htmlload.py) with open and click tracking and DKIM, against the
    #    peers relaying the same messages with DKIM.
    against = {"b": ("b", "c"), "b0": ("b",), "t": ("t",), "c465": ("c465",), "b-m1": ("b-m1",)}
    print("| mailrelay case | peers' case | size | mailrelay msg/s | p50 ms | p99 ms | e2e/s | " +
          " | ".join(f"{p} msg/s | ratio | {p} e2e/s | e2e ratio" for p in PEERS) + " |")
    print("|" + "---|" * (7 + 4 * len(PEERS)))
    for (anchor, case, size), rows in sorted(cells.items()):
        if anchor != "mailrelay":
            continue
        rate, e2e = med(rows, "msgs_per_s"), med(rows, "e2e_msgs_per_s")
        for peer_case in against.get(case, (case,)):
            line = [case, peer_case, f"{size // 1024} KB", rate, med(rows, "lat_ms", "p50"),
                    med(rows, "lat_ms", "p99"), e2e]
            for peer in PEERS:
                other = cells.get((peer, peer_case, size)) or []
                prate, pe2e = med(other, "msgs_per_s"), med(other, "e2e_msgs_per_s")
                line += [prate, f"{rate / prate:.2f}x" if rate and prate else "-", pe2e,
                         f"{e2e / pe2e:.2f}x" if e2e and pe2e else "-"]
            print("| " + " | ".join("-" if v is None else str(v) for v in line) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
