"""TCP delay proxy: forwards connections to a target and holds every byte back by a one-way delay.

Each direction is a delay line, not a per-chunk sleep: a chunk is stamped when it arrives and released
at arrival + delay while later chunks keep arriving, so throughput is whatever the links around the
proxy allow and only latency is added. The delay may depend on the client's source IP (a dict or a
callable), which is how the lab gives a connection between nodes A and B the latency of both links.

Half-close travels like data (an EOF is released after the delay, then the other direction may go on);
a reset on either side resets the other at once (a reset discards data in flight anyway). A direction
buffers at most ``max_buffer`` bytes before it stops reading, so a slow receiver back-pressures the
sender through TCP instead of growing memory.

Accuracy: a chunk never leaves before arrival + delay, and usually about 0.5 ms after it (the event
loop's timers count whole milliseconds, plus the wake-up); bench/links.py prints the resulting RTT.

Limitation worth stating with any figure: the proxy terminates TCP, so each leg has a short RTT and its
own congestion control. The application sees the added latency on every exchange, but a bulk transfer
does not suffer the slow start and window limits that a real long-RTT path imposes on one TCP flow.

Runs in-process (``DelayProxy``) or as a process (``python -m antorcha.netem.proxy``; see
``proxy_process.py``), which the lab starts inside its hub network namespace. The process reports on
stdout, one JSON object per line: ``listening``, then ``opened``/``closed`` per connection (with byte
counts), ``stopped``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import signal
import socket
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

CHUNK = 256 * 1024
DEFAULT_MAX_BUFFER = 32 * 1024 * 1024

DelaySpec = float | Mapping[str, float] | Callable[[str], float]


@dataclass
class ProxyStats:
    """Totals over the proxy's life; ``bytes_up`` is client → target, ``bytes_down`` target → client."""

    opened: int = 0
    closed: int = 0
    resets: int = 0
    failed: int = 0  # the target refused or could not be reached
    bytes_up: int = 0
    bytes_down: int = 0

    @property
    def active(self) -> int:
        return self.opened - self.closed


@dataclass
class ConnectionRecord:
    client: str
    delay_s: float
    bytes_up: int = 0
    bytes_down: int = 0
    outcome: str = "open"  # then "closed", "reset" or "failed"


def _check_delay(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


def _delay_function(delay: DelaySpec, default_delay: float) -> Callable[[str], float]:
    if callable(delay):
        return delay
    if isinstance(delay, Mapping):
        table = {str(ip): _check_delay(d, f"delay for {ip}") for ip, d in delay.items()}
        return lambda ip: table.get(ip, default_delay)
    fixed = _check_delay(delay, "delay")
    return lambda ip: fixed


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST, not FIN, so the peer learns the connection broke rather than ended."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _no_delay(writer: asyncio.StreamWriter) -> None:
    # Nagle plus delayed ACKs would add up to tens of ms per exchange on top of the delay we emulate.
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _DelayLine:
    """One direction of one connection: read, stamp, hold, write."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        delay_s: float,
        max_buffer: int,
        count: Callable[[int], None],
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._delay = delay_s
        self._max_buffer = max_buffer
        self._count = count
        self._queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self._buffered = 0
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()

    async def run(self) -> None:
        """Returns after the EOF went out; raises ``ConnectionError`` if either side broke."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._read())
            tasks.create_task(self._write())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await self._reader.read(CHUNK)
            self._queue.append((loop.time() + self._delay, data or None))
            self._arrived.set()
            if not data:
                return
            self._buffered += len(data)
            while self._buffered > self._max_buffer:
                self._room.clear()
                await self._room.wait()

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            wait = self._queue[0][0] - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            # Everything due by now goes out in one write: fewer syscalls, same timing.
            now = loop.time()
            chunks: list[bytes] = []
            eof = False
            while self._queue and self._queue[0][0] <= now:
                data = self._queue.popleft()[1]
                if data is None:
                    eof = True
                    break
                chunks.append(data)
            if chunks:
                payload = b"".join(chunks)
                self._writer.write(payload)
                await self._writer.drain()
                self._count(len(payload))
                self._buffered -= len(payload)
                self._room.set()
            if eof:
                if self._writer.can_write_eof():
                    self._writer.write_eof()
                return


class DelayProxy:
    """Listens, and forwards each connection to ``target`` with a one-way delay in both directions.

    ``delay`` is seconds: a number, a dict from client IP to seconds (``default_delay`` for others),
    or a callable taking the client IP. ``on_close`` is called with each finished connection's record.
    """

    def __init__(
        self,
        target: tuple[str, int],
        delay: DelaySpec = 0.0,
        *,
        default_delay: float = 0.0,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        on_open: Callable[[ConnectionRecord], None] | None = None,
        on_close: Callable[[ConnectionRecord], None] | None = None,
    ) -> None:
        if max_buffer < CHUNK:
            raise ValueError(f"max_buffer must be at least {CHUNK} bytes, got {max_buffer}")
        self.target = (str(target[0]), int(target[1]))
        self._delay_for = _delay_function(delay, _check_delay(default_delay, "default_delay"))
        self._max_buffer = max_buffer
        self._on_open = on_open
        self._on_close = on_close
        self.stats = ProxyStats()
        self.records: list[ConnectionRecord] = []
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.address: tuple[str, int] = ("", 0)

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, *, sock: socket.socket | None = None
    ) -> tuple[str, int]:
        """Start listening on (host, port), or on an already bound and listening ``sock``."""
        if sock is not None:
            self._server = await asyncio.start_server(self._accept, sock=sock, limit=CHUNK)
        else:
            self._server = await asyncio.start_server(self._accept, host, port, limit=CHUNK)
        bound = self._server.sockets[0].getsockname()
        self.address = (bound[0], bound[1])
        return self.address

    async def close(self) -> None:
        """Stop listening and reset every open connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> DelayProxy:
        if self._server is None:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            # Only close() cancels us, and it awaits us. Letting the cancellation out would make
            # Python 3.11's stream callback log it as an error.
            pass
        finally:
            self._handlers.discard(task)

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        peer = client_writer.get_extra_info("peername")
        client_ip = str(peer[0]) if peer else ""
        record = ConnectionRecord(client=client_ip, delay_s=float(self._delay_for(client_ip)))
        self.records.append(record)
        self.stats.opened += 1
        if self._on_open is not None:
            self._on_open(record)
        target_writer: asyncio.StreamWriter | None = None
        try:
            try:
                target_reader, target_writer = await asyncio.open_connection(*self.target, limit=CHUNK)
            except OSError:
                record.outcome = "failed"
                _reset(client_writer)
                return
            _no_delay(client_writer)
            _no_delay(target_writer)
            up = _DelayLine(
                client_reader, target_writer, record.delay_s, self._max_buffer, self._counter(record, True)
            )
            down = _DelayLine(
                target_reader, client_writer, record.delay_s, self._max_buffer, self._counter(record, False)
            )
            broken = False
            try:
                async with asyncio.TaskGroup() as both:
                    both.create_task(up.run())
                    both.create_task(down.run())
            except* OSError:
                broken = True
            record.outcome = "reset" if broken else "closed"
            if broken:
                _reset(client_writer)
                _reset(target_writer)
            else:
                client_writer.close()
                target_writer.close()
        except asyncio.CancelledError:
            record.outcome = "reset"
            _reset(client_writer)
            if target_writer is not None:
                _reset(target_writer)
            raise
        finally:
            self.stats.closed += 1
            if record.outcome == "reset":
                self.stats.resets += 1
            elif record.outcome == "failed":
                self.stats.failed += 1
            if self._on_close is not None:
                self._on_close(record)

    def _counter(self, record: ConnectionRecord, upward: bool) -> Callable[[int], None]:
        def count(n: int) -> None:
            if upward:
                record.bytes_up += n
                self.stats.bytes_up += n
            else:
                record.bytes_down += n
                self.stats.bytes_down += n

        return count


# --- as a process -------------------------------------------------------------------------------


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _emit(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


async def _serve_forever(args: argparse.Namespace) -> None:
    by_source = {ip: ms / 1e3 for ip, ms in json.loads(args.delay_ms_by_source).items()}
    delay: DelaySpec = by_source if by_source else args.delay_ms / 1e3

    def opened(r: ConnectionRecord) -> None:
        _emit("opened", client=r.client, delay_s=r.delay_s)

    def closed(r: ConnectionRecord) -> None:
        _emit("closed", **asdict(r))

    proxy = DelayProxy(args.target, delay, default_delay=args.delay_ms / 1e3, on_open=opened, on_close=closed)
    try:
        if args.listen_fd is not None:
            host, port = await proxy.start(sock=socket.socket(fileno=args.listen_fd))
        else:
            host, port = await proxy.start(*args.listen)
    except OSError as e:
        where = f"fd {args.listen_fd}" if args.listen_fd is not None else "{}:{}".format(*args.listen)
        sys.exit(f"cannot listen on {where}: {e}")
    _emit("listening", host=host, port=port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await proxy.close()
    _emit("stopped", **asdict(proxy.stats))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m antorcha.netem.proxy", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--target", type=_host_port, required=True, help="HOST:PORT to forward to")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--listen", type=_host_port, help="HOST:PORT to listen on (port 0: any)")
    where.add_argument("--listen-fd", type=int, help="an inherited, bound and listening socket")
    parser.add_argument(
        "--delay-ms", type=float, default=0.0, help="one-way delay (for clients not listed by source)"
    )
    parser.add_argument(
        "--delay-ms-by-source",
        default="{}",
        help='JSON: client IP -> one-way delay in ms, e.g. {"10.0.0.2": 25}',
    )
    args = parser.parse_args(argv)
    asyncio.run(_serve_forever(args))


if __name__ == "__main__":
    main()
