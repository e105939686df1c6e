"""A TCP proxy that breaks connections on demand: refuse, reset or swallow them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from tests.support.net import free_port

T = TypeVar("T")


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's socket and ours to the upstream."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    holed: bool = False
    pumps: int = 2

    def abort(self) -> None:
        self.client.transport.abort()
        self.upstream.transport.abort()


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``upstream_port`` on its own event loop.

    ``refuse()`` stops accepting (as a broker that is not up), ``cut()`` resets every
    connection at once (a partition both sides see at once), ``black_hole()`` drops
    every byte of the open connections and passes no close either way (a partition
    only heartbeats can detect); new connections are forwarded normally.
    """

    def __init__(self, upstream_port: int) -> None:
        self.port = free_port()
        self.upstream_port = upstream_port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="proxy", daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def listen(self) -> None:
        self._call(self._listen())

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    def refuse(self) -> None:
        self._call(self._refuse())

    async def _refuse(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def cut(self) -> int:
        """Reset every open connection; returns how many were cut."""
        return self._call(self._cut())

    async def _cut(self) -> int:
        links = list(self._links)
        for link in links:
            link.abort()
        self._links.clear()
        return len(links)

    def links(self) -> int:
        """How many connections are open through the proxy."""
        return self._call(self._count())

    async def _count(self) -> int:
        return len(self._links)

    def black_hole(self) -> int:
        """Swallow the open connections; returns how many."""
        return self._call(self._black_hole())

    async def _black_hole(self) -> int:
        for link in self._links:
            link.holed = True
        return len(self._links)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst, link))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, link: _Link
    ) -> None:
        try:
            while data := await src.read(65536):
                if link.holed:
                    continue
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            link.pumps -= 1
            # A close passes through, except into a black hole: there each side finds out
            # by itself, and the link goes once both have given up.
            if not link.holed or link.pumps == 0:
                link.abort()
                self._links.discard(link)

    def close(self) -> None:
        self._call(self._refuse())
        self._call(self._cut())
        self._call(self._cancel_all())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
