"""Bytes through a tunnel whose two ends are instances of one master: does running
instances many to a host process cost throughput?

    python bench/master_relay.py [--mib 512]

For each placement a fresh master (on 127.0.0.1, state in a temporary directory)
creates a server instance (tls=0) and a client instance joined to it; one connection
sends ``--mib`` MiB to a sink behind the client, which answers how many bytes it got.
Placements: both ends in one host (``NODEPASS_HOST_SPREAD=1``), the default (the first
instances get a host each, one per core), and a process each (``NODEPASS_HOST_SIZE=1``).
Each is printed with its ratio to the same transfer straight to the sink, measured in
the same run.  Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from master_scale import Master
from run import free_port

BLOCK = b"x" * (1 << 20)


def sink(listener: socket.socket, got: list[int]) -> None:
    """Take one connection, count what it sends until EOF, answer the count."""
    listener.settimeout(30)
    conn, _ = listener.accept()
    conn.settimeout(60)
    with conn:
        total = 0
        while data := conn.recv(1 << 20):
            total += len(data)
        got.append(total)
        conn.sendall(str(total).encode())


def transfer(port: int, listener: socket.socket, mib: int) -> float:
    """MiB/s of ``mib`` MiB sent to 127.0.0.1:``port`` reaching the sink whole."""
    got: list[int] = []
    taker = threading.Thread(target=sink, args=(listener, got))
    taker.start()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        started = time.perf_counter()
        for _ in range(mib):
            conn.sendall(BLOCK)
        conn.shutdown(socket.SHUT_WR)
        answer = conn.recv(64)
        elapsed = time.perf_counter() - started
    taker.join(60)
    if got != [mib << 20] or int(answer or 0) != mib << 20:
        raise RuntimeError(f"the sink got {got} bytes, not {mib << 20}")
    return mib / elapsed


def listening() -> socket.socket:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    return listener


def through_master(env: dict[str, str], mib: int) -> tuple[float, bool]:
    """(MiB/s through the master's two instances, whether they shared a process)."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    master = Master(fork=True)
    try:
        with listening() as backend:
            tunnel, user = free_port(), free_port()
            _, server = master.call("POST", "/instances", {
                "url": f"server://k@127.0.0.1:{tunnel}/127.0.0.1:{user}?tls=0"})
            _, client = master.call("POST", "/instances", {
                "url": f"client://k@127.0.0.1:{tunnel}/127.0.0.1:"
                       f"{backend.getsockname()[1]}"})
            shared = server["data"]["pid"] == client["data"]["pid"]
            deadline = time.monotonic() + 10
            while master.call("GET", f"/instances/{server['data']['id']}")[1]["data"][
                    "pool_size"] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)  # (the client's pool is up: the tunnel carries now)
            return transfer(user, backend, mib), shared
    finally:
        master.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=512)
    args = parser.parse_args()
    with listening() as backend:
        direct = transfer(backend.getsockname()[1], backend, args.mib)
    print(f"{args.mib} MiB over one connection, tls=0; direct to the sink: {direct:.0f} MiB/s")
    print("| placement | MiB/s | ratio to direct | the two ends in |")
    print("|---|---|---|---|")
    for name, env in (("both ends in one host", {"NODEPASS_HOST_SPREAD": "1"}),
                      ("default", {}),
                      ("a process each", {"NODEPASS_HOST_SIZE": "1"})):
        rate, shared = through_master(env, args.mib)
        print(f"| {name} | {rate:.0f} | {rate / direct:.2f} | "
              f"{'one process' if shared else 'two processes'} |")


if __name__ == "__main__":
    main()
