"""A small closed-loop HTTP load generator (stdlib only): T threads, each with one keep-alive connection,
sending GET <path> back to back for D seconds. Prints one JSON line: requests, errors, seconds, rps, p50_ms,
p99_ms. Run in its own process so the load does not share the benchmark's interpreter.

    python bench/load_client.py http://127.0.0.1:8000 /api/v1/jobs/1 --threads 8 --seconds 5 [--token T]
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
from urllib.parse import urlsplit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("base_url")
    parser.add_argument("path")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--token", default="")
    args = parser.parse_args()
    parts = urlsplit(args.base_url)
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    latencies: list[list[float]] = [[] for _ in range(args.threads)]
    errors = [0] * args.threads
    start = threading.Event()
    stop_at = [0.0]

    def worker(index: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        mine = latencies[index]
        start.wait()
        while (t0 := time.perf_counter()) < stop_at[0]:
            try:
                conn.request("GET", args.path, headers=headers)
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    errors[index] += 1
                    continue
            except (OSError, http.client.HTTPException):
                errors[index] += 1
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
                continue
            mine.append(time.perf_counter() - t0)
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.threads)]
    for t in threads:
        t.start()
    began = time.perf_counter()
    stop_at[0] = began + args.seconds
    start.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    ordered = sorted(x for per in latencies for x in per)
    n = len(ordered)

    def pct(q: float) -> float:
        return 1000 * ordered[min(n - 1, int(q / 100 * n))] if n else float("nan")

    print(json.dumps({"requests": n, "errors": sum(errors), "seconds": elapsed, "rps": n / elapsed,
                      "p50_ms": pct(50), "p99_ms": pct(99)}))


if __name__ == "__main__":
    main()
