"""The floor for UDP round trips through any two-process tunnel on this machine.

    python bench/udp_chain.py [--count 20000] [--repeat 3]

A user's datagram through a tunnel wakes four processes in turn (the server, the
client, the target, then the client and the server again) where a direct round trip
wakes one.  This measures that shape with relays that do nothing else: two plain
Python processes joined by TCP (UDP in, a 3-byte frame over TCP, UDP out; epoll, no
framework), in front of the same UDP echo process, against direct round trips to
it in the same run.  What a nodepass tunnel reaches in bench/run.py's ``udp`` row
is to be read against this ratio, not against 1.  Loopback only; every wait is
bounded.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run import UdpEcho, free_port, udp

# The relay ends: epoll over one UDP socket and one TCP connection, bytes moved as they
# come.  ``near`` faces the user (UDP in), ``far`` faces the target (UDP out).
RELAY = r"""
import select, socket, struct, sys
role, tcp_port, udp_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if role == "far":
    listener = socket.socket()
    listener.bind(("127.0.0.1", tcp_port))
    listener.listen()
    print("ready", flush=True)
    tunnel, _ = listener.accept()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.connect(("127.0.0.1", udp_port))
else:
    tunnel = socket.create_connection(("127.0.0.1", tcp_port))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", udp_port))
    print("ready", flush=True)
tunnel.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
poller = select.epoll()
poller.register(tunnel, select.EPOLLIN)
poller.register(udp, select.EPOLLIN)
user, held = None, b""  # (user: the last sender)
while True:
    for fd, _ in poller.poll():
        if fd == udp.fileno():
            data, source = udp.recvfrom(65535)
            user = source
            tunnel.sendall(b"\x23" + struct.pack("!H", len(data)) + data)
            continue
        data = tunnel.recv(65536)
        if not data:
            sys.exit(0)
        held += data
        while len(held) >= 3 and len(held) >= 3 + (size := struct.unpack("!H", held[1:3])[0]):
            payload, held = held[3:3 + size], held[3 + size:]
            if role == "far":
                udp.send(payload)
            else:
                udp.sendto(payload, user)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    echo, tcp, near = free_port(), free_port(), free_port()
    procs = [subprocess.Popen([sys.executable, "-c", UdpEcho.SCRIPT, str(echo)])]
    try:
        for role, udp_port in (("far", echo), ("near", near)):
            proc = subprocess.Popen([sys.executable, "-c", RELAY, role, str(tcp), str(udp_port)],
                                    stdout=subprocess.PIPE, text=True)
            procs.append(proc)
            if proc.stdout is None or proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the {role} relay did not start")
        time.sleep(0.3)
        direct, chain, lost = [], [], 0
        for _ in range(args.repeat):
            for port, rates in ((echo, direct), (near, chain)):
                rate, missing = udp(port, args.count)
                rates.append(rate)
                lost += missing
        d, c = statistics.median(direct), statistics.median(chain)
        print("| udp 512 B round trips/s | direct | two do-nothing relays |")
        print("|---|---|---|")
        print(f"| median of {args.repeat} x {args.count:,} | {d:,.0f} | {c:,.0f} ({c / d:.2f}x) |")
        print(f"\nlost: {lost} (a loss costs the 1 s wait, so a run with losses reads slow)")
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
