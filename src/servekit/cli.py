"""The ``servekit`` command."""

from __future__ import annotations

import argparse
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    import servekit

    parser = argparse.ArgumentParser(prog="servekit", description=servekit.__doc__)
    parser.add_argument("--version", action="version", version=f"servekit {servekit.__version__}")
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
