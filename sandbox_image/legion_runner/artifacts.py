"""Rich values an execution shows: matplotlib figures and images, as PNG.

``plt.show()`` (through :mod:`legion_runner.mpl_backend`, the backend the
runner selects) and a trailing Figure or PIL-style image add one here; the
runner sends them before the execution's result. Bounded per execution in
count and bytes; what is over the bound is counted, not sent.
"""

from __future__ import annotations

import io
import threading
from typing import Any

MAX_PER_EXEC = 8


class Collector:
    """The artifacts of the execution under way."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[tuple[str, bytes, str]] = []
        self._dropped = 0
        self._open = False
        self._max_bytes = 0

    def begin(self, max_bytes: int) -> None:
        with self._lock:
            self._items, self._dropped, self._open = [], 0, True
            self._max_bytes = max_bytes

    def finish(self) -> tuple[list[tuple[str, bytes, str]], int]:
        with self._lock:
            self._open = False
            items, dropped = self._items, self._dropped
            self._items, self._dropped = [], 0
            return items, dropped

    def add(self, mime_type: str, data: bytes, description: str) -> bool:
        with self._lock:
            if not self._open:
                return False
            if len(self._items) >= MAX_PER_EXEC or len(data) > self._max_bytes:
                self._dropped += 1
                return False
            self._items.append((mime_type, data, description[:300]))
            return True


current = Collector()


def is_figure(value: Any) -> bool:
    return type(value).__module__.startswith("matplotlib.figure") and hasattr(value, "savefig")


def is_image(value: Any) -> bool:
    module = type(value).__module__
    return module.startswith("PIL.") and hasattr(value, "save") and hasattr(value, "size")


def _title(figure: Any) -> str:
    try:
        suptitle = figure._suptitle.get_text() if figure._suptitle is not None else ""
        titles = [ax.get_title() for ax in figure.get_axes() if ax.get_title()]
    except Exception:
        return ""
    return suptitle or (titles[0] if titles else "")


def add_figure(figure: Any) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    title = _title(figure)
    number = getattr(figure, "number", None)
    name = f"matplotlib figure {number}" if number is not None else "matplotlib figure"
    current.add("image/png", buffer.getvalue(), f"{name}: {title}" if title else name)


def add_image(image: Any) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    width, height = image.size
    mode = getattr(image, "mode", "")
    current.add("image/png", buffer.getvalue(), f"image {width}x{height} {mode}".strip())


def add_value(value: Any) -> bool:
    """Take a trailing value that is a figure or an image; False for others."""
    if is_figure(value):
        add_figure(value)
        return True
    if is_image(value):
        add_image(value)
        return True
    return False
