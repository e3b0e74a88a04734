"""`python -m service.healthcheck`: exit 0 when the service in this container answers /healthz.

The Docker image's HEALTHCHECK runs it every few seconds, so it uses the standard library only and reads the
port straight from the environment instead of building `Settings`: a check costs milliseconds, not an import
of FastAPI. The image has no curl.
"""

from __future__ import annotations

import os
import sys
import urllib.request

# No proxy: HTTP_PROXY set for the container's outbound traffic must not route a check of 127.0.0.1 elsewhere.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def check(port: str, timeout_s: float = 2.0) -> str | None:
    """None when /healthz answers 200, else why not."""
    try:
        with _DIRECT.open(f"http://127.0.0.1:{port}/healthz", timeout=timeout_s) as response:
            return None if response.status == 200 else f"/healthz answered {response.status}"
    except OSError as error:  # refused, timed out, or an HTTP error status (HTTPError is an OSError)
        return f"/healthz failed: {error}"


def main() -> int:
    problem = check(os.environ.get("CLIPSERVE_PORT") or "8000")
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
