"""Structured logs that go through stdlib logging, so the application decides
what is shown (nothing below WARNING by default), and structlog users can
still bind run ids and render as they like."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

import structlog


def _add_run_ids(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Every log line inside a run carries its run_id (and parent_run_id)."""
    from .telemetry import current_run  # noqa: PLC0415 - telemetry imports this module

    run_id, parent = current_run()
    if run_id is not None:
        event.setdefault("run_id", run_id)
        if parent is not None:
            event.setdefault("parent_run_id", parent)
    return event


def get_logger(name: str) -> Any:
    return structlog.wrap_logger(
        logging.getLogger(name),
        wrapper_class=structlog.stdlib.BoundLogger,
        processors=[
            _add_run_ids,
            structlog.processors.KeyValueRenderer(key_order=["event"], sort_keys=True),
        ],
    )
