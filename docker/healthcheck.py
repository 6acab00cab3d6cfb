"""Container health check: exit 0 when the server's /readyz answers 200, 1 otherwise.

Uses only the standard library (the runtime images carry no curl or wget). The port is RECAST_PORT
(default 8000); the server is asked on the loopback address, which it answers on for any bind address
that covers it (0.0.0.0, or 127.0.0.1).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def ready(port: int, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=timeout) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def main() -> int:
    return 0 if ready(int(os.environ.get("RECAST_PORT", "8000"))) else 1


if __name__ == "__main__":
    sys.exit(main())
