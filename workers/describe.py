"""``python -m workers.describe``: load every model found and print how each went, as JSON.

``triage-admin models list`` runs this in its own process, so triage never imports workers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys

from triage.config import Settings
from triage.errors import ConfigError
from workers.models.registry import ModelRegistry


def main() -> int:
    logging.disable(logging.WARNING)
    try:
        settings = Settings.load()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    statuses = ModelRegistry(settings).load_all()
    print(json.dumps([dataclasses.asdict(status) for status in statuses], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
