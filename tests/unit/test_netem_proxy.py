"""The TCP delay proxy on loopback: data intact both ways, half-close, resets, many connections, counts."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest

from antorcha.netem.proxy import CHUNK, DelayProxy, ProxyStats
from antorcha.netem.proxy_process import spawn_proxy

DEADLINE_S = 60.0  # only a bound on waiting for an outcome on a loaded machine, never a speed check


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF, then half-close back; a broken client just ends the handler."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def exchange(address: tuple[str, int], payload: bytes) -> bytes:
    """Send ``payload``, half-close, read the answer until EOF (writing and reading concurrently)."""
    reader, writer = await asyncio.open_connection(*address)

    async def send() -> None:
        for i in range(0, len(payload), CHUNK):
            writer.write(payload[i : i + CHUNK])
            await writer.drain()
        writer.write_eof()

    sending = asyncio.create_task(send())
    answer = await reader.read()
    await sending
    writer.close()
    return answer


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(DEADLINE_S):
        while not condition():
            await asyncio.sleep(0.01)


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(main())


def test_echo_through_proxy_is_intact_and_counted() -> None:
    async def main() -> None:
        server = await asyncio.start_server(echo_handler, "127.0.0.1", 0)
        target = server.sockets[0].getsockname()[:2]
        async with DelayProxy(target, delay=0.005) as proxy:
            payload = os.urandom(3 * CHUNK + 17)  # several chunks plus a ragged end
            assert await exchange(proxy.address, payload) == payload
            await until(lambda: proxy.stats.closed == 1)
            assert proxy.stats == ProxyStats(
                opened=1, closed=1, bytes_up=len(payload), bytes_down=len(payload)
            )
            assert proxy.records[0].outcome == "closed"
        server.close()

    run(main)


def test_half_close_lets_the_other_direction_finish() -> None:
    async def answer_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()  # only returns once the client's EOF came through the proxy
        writer.write(b"got %d bytes" % len(request))
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(answer_after_eof, "127.0.0.1", 0)
        async with DelayProxy(server.sockets[0].getsockname()[:2], delay=0.01) as proxy:
            assert await exchange(proxy.address, b"x" * 100_000) == b"got 100000 bytes"
            await until(lambda: proxy.stats.closed == 1)
            assert proxy.records[0].outcome == "closed"
            assert (proxy.stats.bytes_up, proxy.stats.bytes_down) == (100_000, 16)
        server.close()

    run(main)


def test_client_reset_is_passed_on_and_the_proxy_goes_on() -> None:
    async def main() -> None:
        seen: list[str] = []

        async def record_end(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while await reader.read(CHUNK):
                    pass
                seen.append("eof")
            except ConnectionResetError:
                seen.append("reset")
            writer.close()

        server = await asyncio.start_server(record_end, "127.0.0.1", 0)
        async with DelayProxy(server.sockets[0].getsockname()[:2], delay=0.02) as proxy:
            sock = socket.create_connection(proxy.address)
            sock.sendall(b"y" * 10_000)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # RST, not FIN
            await until(lambda: proxy.stats.closed == 1)
            assert proxy.stats.resets == 1
            assert proxy.records[0].outcome == "reset"
            await until(lambda: bool(seen))
            assert seen == ["reset"]  # not a clean EOF, which would look like a complete request
        server.close()
        # And the proxy still serves a new connection afterwards.
        echo = await asyncio.start_server(echo_handler, "127.0.0.1", 0)
        async with DelayProxy(echo.sockets[0].getsockname()[:2]) as again:
            assert await exchange(again.address, b"after") == b"after"
        echo.close()

    run(main)


def test_unreachable_target_fails_the_connection() -> None:
    async def main() -> None:
        with socket.create_server(("127.0.0.1", 0)) as placeholder:
            dead = placeholder.getsockname()[:2]  # closed right after: nothing listens there
        async with DelayProxy(dead) as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            with pytest.raises(ConnectionResetError):
                await reader.read()
            writer.close()
            await until(lambda: proxy.stats.closed == 1)
            assert proxy.stats.failed == 1
            assert proxy.records[0].outcome == "failed"

    run(main)


def test_many_concurrent_connections_keep_their_own_bytes() -> None:
    async def main() -> None:
        server = await asyncio.start_server(echo_handler, "127.0.0.1", 0)
        async with DelayProxy(server.sockets[0].getsockname()[:2], delay=0.01) as proxy:
            payloads = [bytes([i]) * (1000 + 997 * i) for i in range(40)]
            answers = await asyncio.gather(*(exchange(proxy.address, p) for p in payloads))
            assert answers == payloads
            await until(lambda: proxy.stats.closed == 40)
            total = sum(map(len, payloads))
            assert (proxy.stats.bytes_up, proxy.stats.bytes_down, proxy.stats.resets) == (total, total, 0)
        server.close()

    run(main)


def test_small_buffer_back_pressures_instead_of_losing_data() -> None:
    async def main() -> None:
        server = await asyncio.start_server(echo_handler, "127.0.0.1", 0)
        async with DelayProxy(server.sockets[0].getsockname()[:2], max_buffer=CHUNK) as proxy:
            payload = os.urandom(32 * CHUNK)
            assert await exchange(proxy.address, payload) == payload
        server.close()

    run(main)


def test_delay_by_source_dict_and_callable() -> None:
    async def main() -> None:
        server = await asyncio.start_server(echo_handler, "127.0.0.1", 0)
        target = server.sockets[0].getsockname()[:2]
        async with DelayProxy(target, {"127.0.0.1": 0.03, "10.0.0.9": 1.0}, default_delay=0.5) as by_dict:
            await exchange(by_dict.address, b"a")
            assert by_dict.records[0].delay_s == 0.03
        async with DelayProxy(target, {"10.0.0.9": 1.0}, default_delay=0.02) as fallback:
            await exchange(fallback.address, b"a")
            assert fallback.records[0].delay_s == 0.02
        async with DelayProxy(target, lambda ip: 0.04 if ip.startswith("127.") else 9.0) as by_call:
            await exchange(by_call.address, b"a")
            assert by_call.records[0].delay_s == 0.04
        server.close()

    run(main)


@pytest.mark.parametrize("delay", [-0.1, float("nan"), {"127.0.0.1": -1}, True])
def test_bad_delays_are_refused(delay: object) -> None:
    with pytest.raises(ValueError, match="must be a finite number of seconds >= 0"):
        DelayProxy(("127.0.0.1", 1), delay)  # type: ignore[arg-type]


def test_proxy_as_a_process_reports_bytes() -> None:
    async def serve_and_talk() -> bytes:
        server = await asyncio.start_server(echo_handler, "127.0.0.1", 0)
        target = server.sockets[0].getsockname()[:2]
        proc = await asyncio.to_thread(spawn_proxy, target, listen=("127.0.0.1", 0), delay_ms=5)
        try:
            answer = await exchange(proc.address, b"p" * 70_000)
            await asyncio.to_thread(proc.wait_for, lambda s: s.closed == 1, DEADLINE_S)
            assert proc.stats.bytes_up == proc.stats.bytes_down == 70_000
            assert proc.records[0].delay_s == 0.005
            return answer
        finally:
            proc.stop()
            server.close()

    assert asyncio.run(serve_and_talk()) == b"p" * 70_000


def test_spawn_reports_why_the_proxy_did_not_start() -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        taken = busy.getsockname()[:2]
        with pytest.raises(RuntimeError, match=r"(?i)delay proxy did not start.*address already in use"):
            spawn_proxy(("127.0.0.1", 9), listen=taken)
