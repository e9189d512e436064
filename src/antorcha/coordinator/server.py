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
from antorcha.config import CoordinatorConfig
from antorcha.coordinator.checkpoints import CheckpointStore
from antorcha.coordinator.core import CoordinatorCore
from antorcha.coordinator.replica import CoordinatorReplica
from antorcha.coordinator.service import CoordinatorService
from antorcha.coordinator.store import RunStore
from antorcha.dashboard.http import DashboardServer
from antorcha.proto.antorcha.v1 import coordinator_pb2_grpc as pb_grpc

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


async def serve(config: CoordinatorConfig, ready_file: Path | None = None) -> None:
    settings, spec = config.coordinator, config.run
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
    core = None
    dashboard: DashboardServer | None = None
    server = grpc.aio.server(options=grpc_options(settings.max_message_bytes))
    try:
        replica = CoordinatorReplica(spec)
        store = RunStore(data_dir / "run.sqlite") if data_dir is not None else None
        checkpoints = (
            CheckpointStore(data_dir / "checkpoints", settings.checkpoints_keep) if data_dir else None
        )
        core = CoordinatorCore(spec, settings, replica, backend, store, checkpoints)
        await core.start()
        pb_grpc.add_CoordinatorServicer_to_server(
            CoordinatorService(core, backend.bootstrap_maddrs()), server
        )
        port = server.add_insecure_port(f"{settings.host}:{settings.port}")
        await server.start()
        address = f"{settings.host}:{port}"
        log.info(
            "coordinator listening address=%s run=%s params=%d bootstrap=%s",
            address,
            spec.run_id,
            replica.num_parameters,
            backend.bootstrap_maddrs(),
        )
        ready = {"address": address, "pid": os.getpid(), "http_address": ""}
        if settings.http_port:
            http_host = settings.http_host or settings.host
            dashboard = DashboardServer(core, http_host, settings.http_port)
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
        ticks = asyncio.create_task(core.run_ticks())
        await stop.wait()
        log.info("coordinator stopping")
        ticks.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticks
    finally:
        if dashboard is not None:
            await dashboard.stop()
        await server.stop(grace=2)
        if core is not None:
            core.close()
        backend.close()
