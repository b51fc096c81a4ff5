"""`make demo`: code runs in a network-less sandbox and calls a tool on the host.

The inventory lives on the host; the sandbox only has a stub that asks the
controller. The vault carries who is asking; it never enters the container.
"""

from __future__ import annotations

import asyncio
import time

import legion

STOCK = {"alice": {"apples": 12, "pears": 3, "plums": 0}, "bob": {"figs": 7}}


class Inventory:
    """The caller's stock, read and changed on the host."""

    def items(self) -> dict[str, int]:
        """What the current user has, by item."""
        return dict(STOCK[legion.vault.require("user")])

    def take(self, item: str, count: int) -> int:
        """Remove ``count`` of ``item``; returns what is left. Raises ValueError if short."""
        stock = STOCK[legion.vault.require("user")]
        if stock.get(item, 0) < count:
            raise ValueError(f"only {stock.get(item, 0)} {item} left")
        stock[item] -= count
        return stock[item]


CODE = """
import socket
items = Inventory.items()
low = sorted(name for name, n in items.items() if n < 5)
left = Inventory.take("apples", 2)
try:
    Inventory.take("plums", 1)
except ValueError as e:
    refused = str(e)
try:
    socket.create_connection(("127.0.0.1", 80), timeout=1)
    network = "reachable"
except OSError as e:
    network = f"blocked ({type(e).__name__})"
print(f"low stock: {low}; apples left: {left}; plums: {refused}")
{"low": low, "apples_left": left, "network": network, "uid": __import__("os").getuid()}
"""


async def main() -> None:
    started = time.perf_counter()
    async with legion.Sandbox(tools=[Inventory], vault={"user": "alice"}) as sandbox:
        ready = time.perf_counter() - started
        result = await sandbox.run(CODE)
        limits = sandbox.limits
    if not result.ok:
        raise SystemExit(f"demo failed: {result.error}\n{result.error.traceback}")  # type: ignore[union-attr]
    print("Sandbox code ran in a container; its tool calls were served on the host.\n")
    print(f"  stdout : {result.stdout.strip()}")
    print(f"  value  : {result.value}")
    print(f"  host   : alice now has {STOCK['alice']['apples']} apples (changed by the tool)")
    print(
        f"  timing : sandbox ready in {ready * 1000:.0f} ms, code ran in "
        f"{result.duration * 1000:.1f} ms"
    )
    print("\nLimits in force:")
    print(
        f"  network disabled; memory {limits.memory_mb} MiB (swap included); "
        f"{limits.cpus:g} CPU; {limits.pids} pids"
    )
    print(
        f"  read-only root; /tmp {limits.tmpfs_mb} MiB noexec; user {limits.user}; "
        f"no capabilities; no-new-privileges"
    )
    print(
        f"  timeout {limits.timeout_seconds:g} s; output kept "
        f"{limits.output_limit_bytes // 1024} KiB per stream; messages up to "
        f"{limits.max_message_bytes // (1024 * 1024)} MiB"
    )


if __name__ == "__main__":
    asyncio.run(main())
