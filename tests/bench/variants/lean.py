"""Variant: `noreset` and `rawhttp` together (no pool reset query, the small upstream client)."""

from __future__ import annotations

import _base
import noreset
import rawhttp

if __name__ == "__main__":
    noreset.apply()
    rawhttp.apply()
    _base.serve()
