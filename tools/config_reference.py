"""Print every config field (section, name, default, doc) as markdown: the reference table in
docs/training.md is this script's output, and a test checks the doc lists every field.

    python tools/config_reference.py > /tmp/fields.md
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from papo_mega.config import Config  # noqa: E402


def config_fields() -> list[tuple[str, str, object, str]]:
    """(section, field, default, doc) for every field of every section of Config."""
    rows = []
    for section in dataclasses.fields(Config):
        if not dataclasses.is_dataclass(section.default_factory if section.default_factory is not dataclasses.MISSING
                                        else None):
            continue
        for item in dataclasses.fields(section.default_factory):
            default = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
            rows.append((section.name, item.name, default, item.metadata.get("doc", "")))
    return rows


def main() -> None:
    current = None
    for section, name, default, doc in config_fields():
        if section != current:
            print(f"\n### `{section}`\n\n| field | default | meaning |\n|---|---|---|")
            current = section
        print(f"| `{section}.{name}` | `{default!r}` | {doc.replace('|', '/')} |")


if __name__ == "__main__":
    main()
