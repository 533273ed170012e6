"""How closely ``rate=`` holds a tunnel to its limit, at several rates.

    python bench/rate.py [--rates 8,80,800] [--seconds 5] [--connections 1]

For each rate a real nodepass server (``?rate=N``) and client carry an upload and
a download at the same time (``--connections`` of each, sharing the limit, as
they do); the table gives what each direction achieved against the limit, and
the unlimited tunnel of the same run for scale.  On 127.0.0.1 only; every
transfer is bounded in bytes and time.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from run import BLOCK, HERE, Procs, free_port, wait_port

DEADLINE = 120.0


async def upload(port: int, total: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent = 0
    while sent < total:
        chunk = BLOCK[: min(len(BLOCK), total - sent)]
        writer.write(chunk)
        await writer.drain()
        sent += len(chunk)
    writer.write_eof()
    await reader.read()  # the sink answers its digest once it has every byte
    writer.close()


async def download(port: int, total: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"%d\n" % total)
    got = 0
    while chunk := await reader.read(1 << 20):
        got += len(chunk)
    writer.close()
    if got != total:
        raise RuntimeError(f"download: got {got} of {total} bytes")


async def both_ways(sink: int, source: int, total: int, connections: int) -> tuple[float, float]:
    """Seconds until the uploads finished, and until the downloads finished."""
    start = time.perf_counter()

    async def timed(transfers: list) -> float:
        await asyncio.gather(*transfers)
        return time.perf_counter() - start

    share = total // connections
    up, down = await asyncio.wait_for(asyncio.gather(
        timed([upload(sink, share) for _ in range(connections)]),
        timed([download(source, share) for _ in range(connections)])), DEADLINE)
    return up, down


def tunnel(procs: Procs, backend: int, query: str) -> int:
    tunnel_port, exposed = free_port(), free_port()
    procs.start("-m", "nodepass",
                f"server://bench@127.0.0.1:{tunnel_port}/127.0.0.1:{exposed}{query}")
    wait_port(tunnel_port)
    procs.start("-m", "nodepass",
                f"client://bench@127.0.0.1:{tunnel_port}/127.0.0.1:{backend}?log=warn&mode=2")
    wait_port(exposed)
    return exposed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="8,80,800", help="Mbit/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each transfer")
    parser.add_argument("--connections", type=int, default=1, help="per direction")
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    procs = Procs()
    rows = []
    try:
        echo, sink, source = free_port(), free_port(), free_port()
        procs.start(str(HERE / "backends.py"), str(echo), str(sink), str(source))
        wait_port(sink)
        for rate in [*rates, 0]:
            query = f"?log=warn&rate={rate}"
            ports = tunnel(procs, sink, query), tunnel(procs, source, query)
            time.sleep(1.0)  # pools
            limit = rate * 125_000  # bytes/s
            total = int((limit or 125_000_000) * args.seconds)
            up, down = asyncio.run(both_ways(ports[0], ports[1], total, args.connections))
            rows.append((rate, total, total / up, total / down))
            print(f"measured rate={rate}", file=sys.stderr, flush=True)
    finally:
        procs.stop()
    print(f"| rate= (Mbit/s) | bytes each way | upload MB/s | download MB/s | "
          f"upload / limit | download / limit |  ({args.connections} connection(s) each way)")
    print("|---|---|---|---|---|---|")
    for rate, total, up, down in rows:
        limit = rate * 125_000
        ratio = (f"{up / limit:.3f} | {down / limit:.3f}" if limit else "- | -")
        print(f"| {rate or 'none'} | {total:,} | {up / 1e6:,.2f} | {down / 1e6:,.2f} | {ratio} |")


if __name__ == "__main__":
    main()
