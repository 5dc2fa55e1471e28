"""docs/training.md stays true to the code: it lists every config field with its current default."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

from config_reference import config_fields  # noqa: E402


def test_training_doc_lists_every_config_field_with_its_default():
    doc = (REPO / "docs" / "training.md").read_text()
    missing = [f"{s}.{n}" for s, n, default, _ in config_fields() if f"| `{s}.{n}` | `{default!r}` |" not in doc]
    assert not missing, f"docs/training.md is missing or has stale defaults for {missing}; regenerate with tools/config_reference.py"
