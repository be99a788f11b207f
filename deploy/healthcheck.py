"""Container health checks for docker-compose.yml, the Dockerfile and the Kubernetes probes.

    python deploy/healthcheck.py http URL [--accept 200,401]   # an HTTP endpoint answers with an accepted status
    python deploy/healthcheck.py celery NODE                   # a Celery worker answers a ping (`%h` = this host)

Standard library only for `http` (it runs every few seconds in every web container); `celery` uses the
platform's own broker settings, because kombu's Redis bindings are keyed with the platform's separator and a
client with Celery's defaults would never see the reply.
"""

from __future__ import annotations

import argparse
import socket
import sys
import urllib.error
import urllib.request


def check_http(url: str, accept: set[int], timeout: float) -> str | None:
    """None if `url` answers with an accepted status, else why not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        return f"{url}: {exc}"
    return None if status in accept else f"{url}: HTTP {status}"


def check_celery(node: str, timeout: float) -> str | None:
    """None if the Celery worker `node` answers a ping within `timeout` seconds."""
    from celery import Celery
    from trainyard.config import Settings
    from trainyard.queueing import celery_config

    node = node.replace("%h", socket.gethostname())
    app = Celery("trainyard-healthcheck")
    app.conf.update(celery_config(Settings()))
    try:
        replies = app.control.ping(destination=[node], timeout=timeout)
    finally:
        app.close()
    return None if any(node in reply for reply in replies) else f"no ping reply from {node}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    http = sub.add_parser("http")
    http.add_argument("url")
    http.add_argument("--accept", default="200", help="comma-separated statuses that count as healthy")
    http.add_argument("--timeout", type=float, default=10.0)
    celery = sub.add_parser("celery")
    celery.add_argument("node", help="Celery node name, e.g. gpu0@%%h")
    celery.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.kind == "http":
        problem = check_http(args.url, {int(s) for s in args.accept.split(",")}, args.timeout)
    else:
        problem = check_celery(args.node, args.timeout)
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
