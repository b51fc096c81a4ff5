"""Blocking calls of async Legion code, with or without a running event loop."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["run_blocking"]

T = TypeVar("T")


def run_blocking(work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` to the end and return its value, from code that cannot ``await``.

    Without a running event loop this is ``asyncio.run(work)``. Where a loop
    is already running in this thread (Jupyter, a web framework's handler),
    ``asyncio.run`` would refuse, so ``work`` runs on a loop of its own in a
    worker thread (with a copy of this context: vault bindings, models set by
    ``use_models``...) and this thread waits for it, which also blocks the
    running loop until then. An interrupt (Ctrl-C) while waiting cancels
    ``work``, and its sandboxes are removed, before it is raised here.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(work)
    return _on_a_worker_thread(work)


def _on_a_worker_thread(work: Coroutine[Any, Any, T]) -> T:
    running: list[tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]]] = []
    outcome: list[T] = []
    failure: list[BaseException] = []

    async def main() -> T:
        task = asyncio.current_task()
        assert task is not None
        running.append((asyncio.get_running_loop(), task))
        return await work

    def target() -> None:
        try:
            outcome.append(asyncio.run(main()))
        except BaseException as exc:  # handed to the waiting thread, raised there
            failure.append(exc)

    context = contextvars.copy_context()
    worker = threading.Thread(target=context.run, args=(target,), name="legion-run-sync")
    worker.start()
    try:
        worker.join()
    except BaseException:
        for loop, task in running:
            loop.call_soon_threadsafe(task.cancel)
        worker.join()
        raise
    if failure:
        raise failure[0]
    return outcome[0]
