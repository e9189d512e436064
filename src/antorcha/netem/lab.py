"""``NetworkLab``: a private network on one machine where each node's link has a set bandwidth and RTT.

Topology. A *hub* network namespace holds a Linux bridge (10.201.0.1/16). Each node gets its own
network namespace joined to the bridge by a veth pair (``eth0`` in the node, ``v<i>`` in the hub) and
its own address on the bridge (``lab.address(node)``); loopback is up everywhere, so processes started
with ``lab.command(node, argv)`` listen and connect as usual.

Bandwidth is the kernel's: a ``tc tbf`` qdisc on both ends of a node's veth pair, at the node's rate.
The node's end shapes its uplink, the hub's end its downlink, so traffic from A to B crosses A's uplink
and B's downlink. Nodes given ``None`` (e.g. the coordinator) are not shaped.

Latency is a TCP delay proxy (``proxy.py``), because this kernel has no ``netem``. ``lab.expose(node,
port)`` starts one in the hub namespace and returns the address to dial instead of ``node:port``; it
delays each direction by (rtt_dialer + rtt_node) / 4, so the round trip between A and B is the mean of
their RTTs (two nodes at 100 ms see 100 ms; a node at 100 ms and an unshaped one see 50 ms). The direct
address ``lab.address(node)`` has bandwidth limits and no added latency. Through the proxy, the target
sees connections coming from the hub's address, not the dialer's.

Cleanup. Nothing is created in the host's namespace: the namespaces are anonymous and held only by the
keeper process (``keeper.py``). When the lab closes, or the launcher dies, even by SIGKILL, the keeper
ends every process still inside the lab's namespaces (proxies and commands alike, SIGTERM then
SIGKILL) and lets go of the namespaces, which the kernel then destroys with their bridge, veths and
qdiscs. Several labs at once are independent: every name lives inside
that lab's own namespaces. The keeper only learns of a launcher's death through its stdin pipe, so a
child forked (not exec'd) by the launcher that inherits the pipe delays the teardown until it exits.

A launcher in the host namespace (e.g. a test polling the coordinator) reaches a node through
``lab.expose_to_host(node, port)``: a listening socket on the host's 127.0.0.1 whose connections an
undelayed proxy in the hub forwards to the node (shaped by the node's downlink like any traffic to it).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from antorcha.netem.links import LinkSpec, parse_link
from antorcha.netem.proxy import ProxyStats
from antorcha.netem.proxy_process import ProxyProcess, spawn_proxy

METHOD = "kernel: tc tbf per veth in network namespaces; latency: TCP delay proxy"
NETWORK = ipaddress.IPv4Network("10.201.0.0/16")
HUB_ADDRESS = str(NETWORK.network_address + 1)
HUB = "\0hub"  # not a valid node name, so it cannot clash with one
MIN_BURST = 128 * 1024  # above a 64 KiB GSO packet, so tbf passes it whole instead of segmenting it
MIN_QUEUE = 128 * 1024


class LabError(RuntimeError):
    """The lab cannot be built here, or a command inside it failed."""


def tbf_args(spec: LinkSpec) -> list[str]:
    """tc arguments for a tbf at ``spec``'s rate: burst of ≥ 5 ms of traffic, queue of ≥ 20 ms."""
    rate = spec.bytes_per_s
    burst = max(MIN_BURST, int(rate * 0.005))
    limit = burst + max(MIN_QUEUE, int(rate * 0.020))
    return ["tbf", "rate", f"{round(spec.bandwidth_bps)}bit", "burst", str(burst), "limit", str(limit)]


def _tools() -> dict[str, str]:
    """Absolute paths of the programs the lab runs; ``LabError`` naming the one that is missing."""
    found = {}
    for name, package in (("ip", "iproute2"), ("tc", "iproute2"), ("nsenter", "util-linux")):
        path = shutil.which(name) or next(
            (p for d in ("/usr/sbin", "/sbin", "/usr/bin") if os.access(p := f"{d}/{name}", os.X_OK)), None
        )
        if path is None:
            raise LabError(f"`{name}` not found on PATH or in /usr/sbin: install the {package} package")
        found[name] = path
    return found


def _check_host() -> dict[str, str]:
    if not sys.platform.startswith("linux"):
        raise LabError(f"the lab needs Linux network namespaces; this is {sys.platform}")
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, veth pairs and tc); run it as root")
    return _tools()


@functools.cache
def available() -> tuple[bool, str]:
    """Whether a lab can be built here, with the reason; tries a one-node shaped lab once per process."""
    try:
        with NetworkLab({"probe": LinkSpec(100, 0)}):
            pass
    except LabError as e:
        return False, str(e)
    return True, METHOD


class NetworkLab:
    """Nodes with their own network namespace and link; see the module docstring.

    ``nodes`` maps a name to a ``LinkSpec``, a spec string such as ``"100mbit/100ms"``, or ``None``
    (no shaping, no latency of its own).
    """

    method = METHOD

    def __init__(self, nodes: Mapping[str, LinkSpec | str | None], *, grace_s: float = 3.0) -> None:
        if not nodes:
            raise ValueError("a NetworkLab needs at least one node")
        if len(nodes) > NETWORK.num_addresses - 3:
            raise ValueError(f"at most {NETWORK.num_addresses - 3} nodes, got {len(nodes)}")
        self.links: dict[str, LinkSpec | None] = {}
        for name, spec in nodes.items():
            if not isinstance(name, str) or not name or name == HUB:
                raise ValueError(f"node names must be non-empty strings, got {name!r}")
            if isinstance(spec, str):
                spec = parse_link(spec)
            if spec is not None and not isinstance(spec, LinkSpec):
                raise TypeError(f"node {name!r}: expected a LinkSpec, a spec string or None, got {spec!r}")
            self.links[name] = spec
        self._addresses = {name: str(NETWORK.network_address + 2 + i) for i, name in enumerate(self.links)}
        self._grace_s = grace_s
        self._tools: dict[str, str] = {}
        self._keeper: subprocess.Popen[str] | None = None
        self._paths: dict[str, str] = {}
        self._proxies: dict[tuple[str, str, int], ProxyProcess] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.leftover_pids: list[int] = []  # processes the teardown could not end (should stay empty)

    # --- lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> NetworkLab:
        self.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # A body's own exception matters more than a teardown complaint, so that one is not raised then.
        self.close(check=exc_type is None)

    def start(self) -> None:
        if self._keeper is not None or self._closed:
            raise LabError("a NetworkLab starts once; build a new one")
        self._tools = _check_host()
        try:
            self._start_keeper()
            self._build()
        except BaseException:
            self.close(check=False)
            raise

    def _start_keeper(self) -> None:
        keeper = subprocess.Popen(
            [
                *(sys.executable, "-m", "antorcha.netem.keeper"),
                *("--count", str(len(self.links) + 1), "--grace-s", repr(self._grace_s)),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._keeper = keeper
        assert keeper.stdout is not None
        line = keeper.stdout.readline()
        msg: dict[str, Any] = json.loads(line) if line.startswith("{") else {}
        if msg.get("event") != "ready":
            detail = msg.get("message") or (keeper.stderr.read() if keeper.stderr else "") or "no output"
            raise LabError(f"could not create network namespaces: {detail.strip()}")
        paths = [f"/proc/{msg['pid']}/fd/{fd}" for fd in msg["fds"]]
        self._paths = dict(zip([HUB, *self.links], paths, strict=True))

    def _build(self) -> None:
        hub = [
            "link set lo up",
            "link add br0 type bridge",
            f"addr add {HUB_ADDRESS}/{NETWORK.prefixlen} dev br0",
            "link set br0 up",
        ]
        hub_tc = []
        for i, (name, spec) in enumerate(self.links.items()):
            hub += [
                f"link add v{i} type veth peer name eth0 netns {self._paths[name]}",
                f"link set v{i} master br0",
                f"link set v{i} up",
            ]
            if spec is not None:
                hub_tc.append(" ".join(["qdisc add dev", f"v{i}", "root", *tbf_args(spec)]))
        self._batch(HUB, "ip", hub)
        if hub_tc:
            self._batch(HUB, "tc", hub_tc)
        for name, spec in self.links.items():
            self._batch(
                name,
                "ip",
                [
                    "link set lo up",
                    f"addr add {self._addresses[name]}/{NETWORK.prefixlen} dev eth0",
                    "link set eth0 up",
                ],
            )
            if spec is not None:
                self._batch(name, "tc", [" ".join(["qdisc add dev eth0 root", *tbf_args(spec)])])

    def _batch(self, where: str, tool: str, lines: list[str]) -> None:
        argv = [self._tools["nsenter"], f"--net={self._paths[where]}", "--", self._tools[tool], "-batch", "-"]
        script = "\n".join(lines) + "\n"
        done = subprocess.run(argv, input=script, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            place = "the hub" if where == HUB else f"node {where!r}"
            raise LabError(f"`{tool}` failed in {place} (exit {done.returncode}): {done.stderr.strip()}")

    def close(self, *, check: bool = True) -> None:
        """Stop the proxies, end every process left in the lab, release the namespaces. Idempotent.

        With ``check``, raise ``LabError`` if some process inside could not be ended."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            proxies = list(self._proxies.values())
        for proxy in proxies:
            proxy.stop()
        keeper = self._keeper
        if keeper is None:
            return
        assert keeper.stdin is not None and keeper.stdout is not None
        try:
            keeper.stdin.write("stop\n")
            keeper.stdin.close()
        except OSError:
            pass  # it is already gone
        try:
            for line in keeper.stdout:
                msg = json.loads(line) if line.startswith("{") else {}
                if msg.get("event") == "done":
                    self.leftover_pids = list(msg.get("left", []))
            keeper.wait(self._grace_s + 30)
        except subprocess.TimeoutExpired:
            keeper.kill()
            keeper.wait()
        finally:
            keeper.stdout.close()
            if keeper.stderr is not None:
                keeper.stderr.close()
        if check and self.leftover_pids:
            raise LabError(f"processes {self.leftover_pids} are still in the lab's namespaces after teardown")

    # --- using the lab ----------------------------------------------------------------------------

    def _path(self, node: str) -> str:
        if node not in self.links and node != HUB:
            raise KeyError(f"no node {node!r} in this lab (nodes: {', '.join(self.links)})")
        if self._closed or not self._paths:
            raise LabError("the lab is not running (use it inside `with NetworkLab(...) as lab:`)")
        return self._paths[node]

    @property
    def nodes(self) -> list[str]:
        return list(self.links)

    @property
    def keeper_pid(self) -> int | None:
        """The process holding the namespaces (see ``keeper.py``); None before ``start``."""
        return self._keeper.pid if self._keeper is not None else None

    def address(self, node: str) -> str:
        """``node``'s IP on the bridge: reachable from every node, shaped, no added latency."""
        self._path(node)
        return self._addresses[node]

    def netns_path(self, node: str) -> str:
        """A path that ``nsenter --net=`` or ``setns`` accepts for ``node``'s network namespace."""
        return self._path(node)

    def command(self, node: str, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside ``node``'s network namespace (same user, files, environment)."""
        path = self._path(node)
        return [self._tools["nsenter"], f"--net={path}", "--", *argv]

    def hub_command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run in the hub (bridge, downlink qdiscs ``v<i>``, proxies): for inspection,
        e.g. ``tc -s qdisc show`` for the bytes each node's downlink carried."""
        path = self._path(HUB)
        return [self._tools["nsenter"], f"--net={path}", "--", *argv]

    def run(self, node: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """``subprocess.run`` inside ``node``; text output captured unless told otherwise."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(node, argv), **kwargs)

    def rtt_ms(self, a: str, b: str) -> float:
        """The round trip that ``expose`` adds between nodes ``a`` and ``b``."""
        return (self._rtt_ms(a) + self._rtt_ms(b)) / 2

    def _rtt_ms(self, node: str) -> float:
        spec = self.links[node]
        return spec.rtt_ms if spec is not None else 0.0

    def expose(self, node: str, port: int) -> tuple[str, int]:
        """An address in the lab where dialing reaches ``node:port`` with the latency of both links."""
        target = (self.address(node), _port(port))
        key = ("lab", node, target[1])
        with self._lock:
            if key not in self._proxies:
                by_source = {self._addresses[n]: self.rtt_ms(n, node) / 2 for n in self.links}
                self._proxies[key] = spawn_proxy(
                    target,
                    listen=(HUB_ADDRESS, 0),
                    delay_ms=self._rtt_ms(node) / 4,
                    delay_ms_by_source=by_source,
                    prefix=[self._tools["nsenter"], f"--net={self._path(HUB)}", "--"],
                )
            return self._proxies[key].address

    def expose_to_host(self, node: str, port: int) -> tuple[str, int]:
        """An address on the host's 127.0.0.1 that reaches ``node:port`` (no added latency)."""
        target = (self.address(node), _port(port))
        key = ("host", node, target[1])
        with self._lock:
            if key not in self._proxies:
                with socket.create_server(("127.0.0.1", 0)) as sock:
                    self._proxies[key] = spawn_proxy(
                        target,
                        listen_sock=sock,
                        prefix=[self._tools["nsenter"], f"--net={self._path(HUB)}", "--"],
                    )
            return self._proxies[key].address

    def proxy(self, node: str, port: int, *, to_host: bool = False) -> ProxyProcess:
        """The proxy behind ``expose`` (or ``expose_to_host``) of ``node:port``, for its byte counts."""
        key = ("host" if to_host else "lab", node, _port(port))
        if key not in self._proxies:
            raise KeyError(f"{node}:{port} was not exposed{' to the host' if to_host else ''}")
        return self._proxies[key]

    def proxy_stats(self, node: str, port: int, *, to_host: bool = False) -> ProxyStats:
        """Connections and bytes each way (client → node is ``bytes_up``) through that proxy so far;
        a connection's bytes count once it has closed."""
        return self.proxy(node, port, to_host=to_host).snapshot()


def _port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port must be an integer in 1..65535, got {port!r}")
    return port
