"""Structured logs that go through stdlib logging, so the application decides
what is shown (nothing below WARNING by default), and structlog users can
still bind run ids and render as they like."""

from __future__ import annotations

import logging
from typing import Any

import structlog


def get_logger(name: str) -> Any:
    return structlog.wrap_logger(
        logging.getLogger(name),
        wrapper_class=structlog.stdlib.BoundLogger,
        processors=[structlog.processors.KeyValueRenderer(key_order=["event"], sort_keys=True)],
    )
