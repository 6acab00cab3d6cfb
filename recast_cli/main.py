"""`recast`: build template banks, train and inspect task artifacts, predict offline."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from recast_cli.commands import UsageError
from recast_cli.logs import configure
from recast_cli.parser import build_parser
from recast_client.errors import RecastClientError
from recast_core.errors import RecastError

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure(logging.DEBUG if args.verbose else logging.INFO)
    func: Callable[[argparse.Namespace], int | None] = args.func
    try:
        code = func(args)
    except (RecastError, UsageError, RecastClientError) as exc:
        message = " ".join(str(exc).split())
        print(f"recast {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("recast: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
