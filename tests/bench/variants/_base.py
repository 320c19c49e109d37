"""Shared by the variants: the project on sys.path, and `serve()` to run chatproxy's CLI.

A variant is `chatproxy serve` with one proposed change applied by patching the running
process before the app is built (uvicorn imports the app in this same process with one worker).
It exists to measure a proposal side by side with the real server (`run.py --variant NAME`);
nothing here is part of the product.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def serve() -> None:
    from proxy.__main__ import main

    sys.exit(main(sys.argv[1:]))


def swap(text: str, old: str, new: str) -> str:
    """`text` with `old` (which must be there: a variant whose code moved fails loudly, rather
    than measuring the shipped server under its name) replaced by `new`."""
    if old not in text:
        raise SystemExit(f"variant: {old!r} is not in the statement it patches")
    return text.replace(old, new)
