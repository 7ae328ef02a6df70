"""``python -m workers [celery worker options]``: what ``triage worker`` runs."""

from __future__ import annotations

import sys

from triage.config import Settings
from triage.errors import ConfigError
from triage.logs import configure_logging
from workers.app import create_celery


def main(argv: list[str]) -> int:
    try:
        settings = Settings.load()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    app = create_celery(settings)
    app.worker_main(["worker", "--loglevel", settings.log_level, "--hostname", "triage@%h", *argv])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
