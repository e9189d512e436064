"""The slow-link lab as root: topology, tbf shaping, reachability direct and through the delay proxy,
and that nothing is left behind, after a clean exit, an exception, or a killed launcher.

Behaviour only: speeds and latencies are measured by bench/links.py, never asserted here.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator

import pytest

from antorcha.netem import LinkSpec, NetworkLab, available
from antorcha.netem.keeper import processes_in

OK, WHY = available()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not OK, reason=f"netem lab unavailable: {WHY}")]

DEADLINE_S = 60.0  # bounds waiting on a loaded machine; never a speed check
ECHO_PORT = 7000

# Echoes each connection until EOF, then half-closes back; prints "ready" once listening.
ECHO_SERVER = textwrap.dedent(
    """
    import socket, sys, threading
    server = socket.create_server(("0.0.0.0", int(sys.argv[1])), backlog=64)
    print("ready", flush=True)
    def echo(conn):
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass
    while True:
        conn, _ = server.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()
    """
)

# Sends N seeded bytes, half-closes, reads the answer to EOF; prints JSON with sizes and digests.
# Mode "reset" instead sends a little and closes with RST.
CLIENT = textwrap.dedent(
    """
    import hashlib, json, random, socket, struct, sys, threading, time
    host, port, size, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    deadline = time.monotonic() + 60
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=60)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    payload = random.Random(size).randbytes(size)
    if mode == "reset":
        conn.sendall(payload)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
        print(json.dumps({"reset": True}))
        sys.exit()
    def send():
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
    sender = threading.Thread(target=send)
    sender.start()
    got = bytearray()
    while chunk := conn.recv(65536):
        got += chunk
    sender.join()
    print(json.dumps({"sent": hashlib.sha256(payload).hexdigest(), "got": hashlib.sha256(got).hexdigest(),
                      "size": len(got)}))
    """
)


def start_echo(lab: NetworkLab, node: str) -> subprocess.Popen[str]:
    server = subprocess.Popen(
        lab.command(node, [sys.executable, "-c", ECHO_SERVER, str(ECHO_PORT)]),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    assert server.stdout.readline().strip() == "ready"
    return server


def talk(argv: list[str], size: int, mode: str = "echo") -> dict[str, object]:
    done = subprocess.run(
        [*argv, str(size), mode], capture_output=True, text=True, timeout=DEADLINE_S * 2, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def client_in(lab: NetworkLab, node: str, host: str, port: int) -> list[str]:
    return lab.command(node, [sys.executable, "-c", CLIENT, host, str(port)])


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {DEADLINE_S} s: {what}")
        time.sleep(0.05)


def host_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip() for line in out.splitlines()}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie has released its namespaces
    except FileNotFoundError:
        return False


def lab_inodes(lab: NetworkLab) -> set[int]:
    return {os.stat(lab.netns_path(n)).st_ino for n in lab.nodes}


@pytest.fixture(scope="module")
def lab() -> Iterator[NetworkLab]:
    nodes = {"coordinator": None, "w0": LinkSpec(20, 40), "w1": LinkSpec(20, 60)}
    with NetworkLab(nodes) as lab:
        server = start_echo(lab, "w1")
        yield lab
        server.terminate()
        server.wait()


def test_shaped_nodes_have_tbf_at_their_rate_on_both_ends(lab: NetworkLab) -> None:
    for node in ("w0", "w1"):
        up = lab.run(node, ["tc", "qdisc", "show", "dev", "eth0"], check=True).stdout
        assert "qdisc tbf" in up and "rate 20Mbit" in up, up
    down = subprocess.run(
        lab.hub_command(["tc", "qdisc", "show"]), capture_output=True, text=True, check=True
    ).stdout
    assert down.count("qdisc tbf") == 2 and down.count("rate 20Mbit") == 2, down
    unshaped = lab.run("coordinator", ["tc", "qdisc", "show", "dev", "eth0"], check=True).stdout
    assert "tbf" not in unshaped


def test_each_node_has_its_address_and_loopback(lab: NetworkLab) -> None:
    addresses = {n: lab.address(n) for n in lab.nodes}
    assert len(set(addresses.values())) == 3
    for node, ip in addresses.items():
        shown = lab.run(node, ["ip", "-o", "addr", "show"], check=True).stdout
        assert f"inet {ip}/16" in shown and "inet 127.0.0.1/8" in shown
    # A process in a node listens and connects on its own loopback.
    assert talk(client_in(lab, "w1", "127.0.0.1", ECHO_PORT), 1000)["size"] == 1000


def test_direct_path_between_nodes_carries_bytes_intact(lab: NetworkLab) -> None:
    answer = talk(client_in(lab, "w0", lab.address("w1"), ECHO_PORT), 300_000)
    assert answer["got"] == answer["sent"] and answer["size"] == 300_000


def test_exposed_path_carries_bytes_intact_and_counts_them(lab: NetworkLab) -> None:
    host, port = lab.expose("w1", ECHO_PORT)
    assert lab.expose("w1", ECHO_PORT) == (host, port)  # one proxy per exposed port
    proxy = lab.proxy("w1", ECHO_PORT)
    before = proxy.wait_for(lambda s: s.active == 0, DEADLINE_S)
    answer = talk(client_in(lab, "w0", host, port), 250_000)
    assert answer["got"] == answer["sent"] and answer["size"] == 250_000
    after = proxy.wait_for(lambda s: s.closed == before.closed + 1, DEADLINE_S)
    assert after.bytes_up - before.bytes_up == 250_000
    assert after.bytes_down - before.bytes_down == 250_000
    record = proxy.records[-1]
    assert (record.client, record.outcome) == (lab.address("w0"), "closed")


def test_exposed_path_delays_by_both_links(lab: NetworkLab) -> None:
    host, port = lab.expose("w1", ECHO_PORT)
    proxy = lab.proxy("w1", ECHO_PORT)
    for node in ("w0", "coordinator"):
        seen = proxy.stats.closed
        talk(client_in(lab, node, host, port), 10)
        proxy.wait_for(lambda s, seen=seen: s.closed == seen + 1, DEADLINE_S)
        # One way is half the pair's round trip, which is the mean of the two nodes' RTTs.
        assert proxy.records[-1].delay_s == pytest.approx(lab.rtt_ms(node, "w1") / 2000)
    assert lab.rtt_ms("w0", "w1") == 50.0
    assert lab.rtt_ms("coordinator", "w1") == 30.0


def test_proxy_survives_a_client_reset(lab: NetworkLab) -> None:
    host, port = lab.expose("w1", ECHO_PORT)
    proxy = lab.proxy("w1", ECHO_PORT)
    before = proxy.wait_for(lambda s: s.active == 0, DEADLINE_S)
    assert talk(client_in(lab, "w0", host, port), 50_000, "reset") == {"reset": True}
    after = proxy.wait_for(lambda s: s.closed == before.closed + 1, DEADLINE_S)
    assert after.resets == before.resets + 1
    assert proxy.records[-1].outcome == "reset"
    answer = talk(client_in(lab, "w0", host, port), 20_000)
    assert answer["got"] == answer["sent"]


def test_host_reaches_a_node_through_expose_to_host(lab: NetworkLab) -> None:
    host, port = lab.expose_to_host("w1", ECHO_PORT)
    assert host == "127.0.0.1"
    with socket.create_connection((host, port), timeout=DEADLINE_S) as conn:
        conn.sendall(b"from the host")
        conn.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := conn.recv(1024):
            got += chunk
    assert got == b"from the host"


def test_bad_use_is_refused_clearly(lab: NetworkLab) -> None:
    with pytest.raises(KeyError, match="no node 'w9'"):
        lab.address("w9")
    with pytest.raises(ValueError, match="port must be an integer"):
        lab.expose("w1", 0)
    with pytest.raises(ValueError, match="bad link spec"):
        NetworkLab({"a": "fast"})
    with pytest.raises(ValueError, match="at least one node"):
        NetworkLab({})


def test_nothing_is_left_after_exit_even_when_the_body_raises() -> None:
    links_before = host_links()
    with pytest.raises(RuntimeError, match="body failed"), NetworkLab({"a": "10mbit/20ms", "b": None}) as lab:
        server = start_echo(lab, "a")
        host, port = lab.expose("a", ECHO_PORT)
        answer = talk(client_in(lab, "b", host, port), 1000)
        assert answer["got"] == answer["sent"]
        inodes = lab_inodes(lab)
        keeper, proxy = lab.keeper_pid, lab.proxy("a", ECHO_PORT).proc
        assert keeper is not None and alive(keeper)
        raise RuntimeError("body failed")
    assert server.wait(DEADLINE_S) is not None  # the teardown ended the process left in the node
    assert not alive(keeper)
    assert proxy.poll() is not None
    assert processes_in(inodes, exclude=-1) == []
    assert lab.leftover_pids == []
    assert host_links() == links_before


LAUNCHER = textwrap.dedent(
    """
    import json, os, subprocess, sys, time
    from antorcha.netem import NetworkLab
    lab = NetworkLab({"a": "10mbit/20ms", "b": "10mbit/20ms"})
    lab.start()
    sleeper = subprocess.Popen(lab.command("a", ["sleep", "600"]))
    lab.expose("b", 7000)
    print(json.dumps({
        "keeper": lab.keeper_pid,
        "proxies": [lab.proxy("b", 7000).proc.pid],
        "sleeper": sleeper.pid,
        "inodes": [os.stat(lab.netns_path(n)).st_ino for n in lab.nodes],
    }), flush=True)
    time.sleep(600)
    """
)


def test_nothing_is_left_when_the_launcher_is_killed() -> None:
    links_before = host_links()
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdout=subprocess.PIPE, text=True)
    assert launcher.stdout is not None
    state = json.loads(launcher.stdout.readline())
    inodes = set(state["inodes"])
    assert alive(state["keeper"]) and alive(state["sleeper"])
    assert processes_in(inodes, exclude=-1)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    for pid in [state["keeper"], state["sleeper"], *state["proxies"]]:
        wait_until(lambda pid=pid: not alive(pid), f"process {pid} ended")
    wait_until(lambda: processes_in(inodes, exclude=-1) == [], "the lab's namespaces are empty")
    assert host_links() == links_before


def test_two_labs_at_once_are_independent() -> None:
    with NetworkLab({"a": "10mbit/10ms"}) as one, NetworkLab({"a": "10mbit/10ms"}) as two:
        assert one.address("a") == two.address("a")  # same private addresses, no clash
        assert lab_inodes(one).isdisjoint(lab_inodes(two))
        servers = [start_echo(one, "a"), start_echo(two, "a")]  # same port in both: no clash either
        for lab in (one, two):
            answer = talk(client_in(lab, "a", "127.0.0.1", ECHO_PORT), 100)
            assert answer["got"] == answer["sent"]
    assert all(s.wait(DEADLINE_S) is not None for s in servers)
