"""The README's configuration reference is the one the settings code generates."""

from __future__ import annotations

import re

from proxy.config import FIELDS
from proxy.configreport import reference_table
from tests.conftest import ROOT


def test_readme_configuration_table_matches_settings() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(
        r"<!-- config-table:start -->\n(.*?)\n<!-- config-table:end -->", readme, re.S
    )
    assert block is not None, "the README has no configuration table markers"
    assert block.group(1).strip() == reference_table().strip()


def test_every_setting_is_an_environment_variable_in_the_table() -> None:
    table = reference_table()
    for spec in FIELDS:
        assert f"| `{spec.env}` | `{spec.key}` |" in table
