"""The coordinator process: starts the hivemind bootstrap peer, the replica, the core, the gRPC server
and the dashboard's HTTP server (same event loop), in that order, and shuts them down cleanly on
SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from pathlib import Path

import grpc
import torch

from antorcha.averaging.hivemind_backend import HivemindBackend
from antorcha.config import CoordinatorConfig, CoordinatorSettings
from antorcha.coordinator.host import RunHost
from antorcha.coordinator.rpc_handlers import add_guarded_servicer
from antorcha.coordinator.service import CoordinatorService
from antorcha.dashboard.http import DashboardServer
from antorcha.security.guard import GuardSettings, RequestGuard
from antorcha.security.tls import TLSConfigError, is_loopback, server_credentials
from antorcha.security.tokens import TokenStore

log = logging.getLogger(__name__)


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def make_guard(settings: CoordinatorSettings) -> RequestGuard:
    """The request guard the settings ask for; SystemExit with the fix when they cannot work."""
    tokens = None
    if settings.auth_enabled():
        path = settings.resolved_tokens_file()
        if not path:
            raise SystemExit(
                "antorcha coordinator: auth is on (host is not loopback, or auth = 'tokens') but there is "
                "nowhere to keep tokens; set [coordinator] data_dir or tokens_file"
            )
        tokens = TokenStore(path)
        if tokens.count() == 0:
            log.warning(
                "auth is on and %s holds no tokens yet: no worker can join until you run "
                "`antorcha token create --name NAME --tokens-file %s`",
                path,
                path,
            )
    return RequestGuard(
        GuardSettings(
            enabled=settings.auth_enabled(),
            session_ttl_s=settings.session_ttl_s,
            max_clock_skew_s=settings.max_clock_skew_s,
            join_rate_per_s=settings.join_rate_per_s,
            join_burst=settings.join_burst,
            worker_rate_per_s=settings.worker_rate_per_s,
            worker_burst=settings.worker_burst,
        ),
        tokens,
    )


def listen(server: grpc.aio.Server, settings: CoordinatorSettings) -> int:
    """Open the gRPC port: TLS when a certificate is given; plaintext only on loopback unless allowed."""
    address = f"{settings.host}:{settings.port}"
    if settings.tls_cert_file or settings.tls_key_file:
        try:
            return server.add_secure_port(
                address, server_credentials(settings.tls_cert_file, settings.tls_key_file)
            )
        except TLSConfigError as e:
            raise SystemExit(f"antorcha coordinator: {e}") from None
    if not is_loopback(settings.host) and not settings.allow_plaintext:
        raise SystemExit(
            f"antorcha coordinator: refusing to serve plaintext gRPC on {settings.host}: set "
            "[coordinator] tls_cert_file and tls_key_file (`antorcha tls self-signed` makes a test pair), "
            "or allow_plaintext = true on a network you trust"
        )
    return server.add_insecure_port(address)


async def serve(config: CoordinatorConfig, ready_file: Path | None = None) -> None:
    settings, spec = config.coordinator, config.run
    guard = make_guard(settings)  # fail on bad auth settings before anything starts
    # hivemind forks its DHT process: do it before gRPC and torch start threads in this process.
    data_dir = Path(settings.data_dir).expanduser() if settings.data_dir else None
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
    backend = HivemindBackend(
        host_maddrs=settings.p2p_host_maddrs,
        announce_maddrs=settings.p2p_announce_maddrs,
        # A fresh libp2p identity on every start: peers that knew the old one would otherwise keep
        # dialing its dead addresses (libp2p dial backoff); workers learn the new one from each group.
    )
    torch.set_num_threads(settings.torch_threads)
    host = RunHost(settings, spec, backend, data_dir)
    dashboard: DashboardServer | None = None
    supervisor: asyncio.Task[None] | None = None
    server = grpc.aio.server(options=grpc_options(settings.max_message_bytes))
    try:
        core = await host.start()
        add_guarded_servicer(CoordinatorService(host, backend.bootstrap_maddrs(), guard), server)
        port = listen(server, settings)
        await server.start()
        address = f"{settings.host}:{port}"
        log.info(
            "coordinator listening address=%s tls=%s auth=%s run=%s params=%d bootstrap=%s",
            address,
            "on" if settings.tls_cert_file else "off",
            "tokens" if guard.enabled else "off",
            core.spec.run_id,
            core.replica.num_parameters,
            backend.bootstrap_maddrs(),
        )
        ready = {"address": address, "pid": os.getpid(), "http_address": ""}
        if settings.http_port:
            http_host = settings.http_host or settings.host
            dashboard = DashboardServer(core, http_host, settings.http_port)
            host.on_switch.append(dashboard.switch)
            try:
                http_port = await dashboard.start()
            except OSError as e:
                raise SystemExit(
                    f"antorcha coordinator: cannot serve the dashboard on {http_host}:{settings.http_port} "
                    f"({e.strerror or e}); set [coordinator] http_port to a free port, or 0 to turn it off"
                ) from None
            ready["http_address"] = f"{http_host}:{http_port}"
            log.info("dashboard on http://%s/ (metrics at /metrics)", ready["http_address"])
        if ready_file is not None:
            _write_atomic(ready_file, json.dumps(ready))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        supervisor = asyncio.create_task(host.supervise())
        await stop.wait()
        log.info("coordinator stopping")
    finally:
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        if dashboard is not None:
            await dashboard.stop()
        await server.stop(grace=2)
        await host.close()
        backend.close()
        if guard.tokens is not None:
            guard.tokens.close()
