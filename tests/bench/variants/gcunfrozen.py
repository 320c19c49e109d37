"""Variant: the shipped server without freezing its startup heap (proxy/app.py, `_frozen`).

For measurement only: every full pass of the cyclic collector walks everything startup built,
as before the freeze.
"""

from __future__ import annotations

import os

import _base

if __name__ == "__main__":
    from proxy import app
    from proxy.config import load_settings

    app.app_from_env = lambda: app.create_app(load_settings(os.environ))  # no freeze=True
    _base.serve()
