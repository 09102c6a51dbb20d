"""Blob transfer between two processes: iroh (lightning_drift.transport) against a plain TCP socket.

Both transports do the same work, the work of a barrier upload: the sender hashes the blob
(sha256) and sends a BlobHeader frame and the bytes in 1 MiB pieces; the receiver hashes what
arrives, writes it to a file (temporary name, fsync, rename) and checks the digest. The time is
taken from the sender starting (hash included, connection set-up excluded) to the receiver
holding the verified file. Sizes are MiB (2^20 bytes); MB/s below means MiB/s.

    python benchmarks/transfer.py                  # 1, 64, 512 MiB, 3 runs each (median)
    python benchmarks/transfer.py --sizes 1,16 --repeat 1

Prints a table, the peak RSS of the two iroh processes above their baseline (the sender's
baseline already holds the blob), and last the line
``transfer: iroh <X> MB/s, tcp <Y> MB/s, ratio <X/Y>`` for the largest size.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20
CHUNK = MiB


# ---------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _mem_baseline() -> int:
    """Current RSS (KiB); also resets the peak-RSS mark where the kernel allows it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass
    return _status_kib("VmRSS")


def _mem_peak() -> int:
    return _status_kib("VmHWM")


def _make_blob(size: int) -> bytes:
    piece = os.urandom(min(size, MiB))
    return (piece * (size // len(piece) + 1))[:size] if size else b""


# ---------------------------------------------------------------------------- iroh


def _iroh_receiver(q: mp.Queue, out: mp.Queue, directory: str) -> None:
    from lightning_drift import protocol as p
    from lightning_drift.transport import Endpoint

    async def main() -> None:
        ep = await Endpoint.bind()
        try:
            q.put(ep.ticket())
            conn = await ep.accept()
            assert conn is not None
            s = await conn.accept_stream()
            base = _mem_baseline()
            header, path = await s.recv_blob(into=Path(directory) / "iroh.bin")
            done = time.time()
            peak = _mem_peak()
            await s.send(p.Bye())
            await s.finish()
            await asyncio.wait_for(conn.closed(), 10)
            Path(path).unlink()
            out.put(("recv", done, base, peak, header.size))
        finally:
            await ep.close()

    asyncio.run(main())


def _iroh_sender(q: mp.Queue, out: mp.Queue, size: int) -> None:
    from lightning_drift import protocol as p
    from lightning_drift.transport import WRITE_PATH, Endpoint

    async def main() -> None:
        ticket = q.get(timeout=60)
        blob = _make_blob(size)
        ep = await Endpoint.bind()
        try:
            conn = await ep.dial(ticket, timeout=15)
            s = await conn.open_stream()
            base = _mem_baseline()
            start = time.time()
            await s.send_blob(blob)
            p.expect(await s.recv(), p.Bye)
            peak = _mem_peak()
            conn.close()
            out.put(("send", start, base, peak, WRITE_PATH))
        finally:
            await ep.close()

    asyncio.run(main())


# ---------------------------------------------------------------------------- tcp


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError("peer closed")
        buf += part
    return bytes(buf)


def _tcp_receiver(q: mp.Queue, out: mp.Queue, directory: str) -> None:
    from lightning_drift import protocol as p

    srv = socket.create_server(("127.0.0.1", 0))
    q.put(srv.getsockname()[1])
    sock, _ = srv.accept()
    base = _mem_baseline()
    n = p.frame_length(_recv_exact(sock, 4))
    header = p.expect(p.decode(_recv_exact(sock, n)), p.BlobHeader)
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    final = Path(directory) / "tcp.bin"
    tmp = final.with_suffix(".part")
    left = header.size
    with tmp.open("wb") as f:
        while left:
            got = sock.recv_into(view, min(left, CHUNK))
            if not got:
                raise ConnectionError("peer closed mid-blob")
            h.update(view[:got])
            f.write(view[:got])
            left -= got
        f.flush()
        os.fsync(f.fileno())
    if h.hexdigest() != header.sha256:
        raise RuntimeError("checksum mismatch")
    os.replace(tmp, final)
    done = time.time()
    peak = _mem_peak()
    sock.sendall(b"ok")
    sock.close()
    final.unlink()
    out.put(("recv", done, base, peak, header.size))


def _tcp_sender(q: mp.Queue, out: mp.Queue, size: int) -> None:
    from lightning_drift import protocol as p

    port = q.get(timeout=60)
    blob = _make_blob(size)
    sock = socket.create_connection(("127.0.0.1", port))
    base = _mem_baseline()
    start = time.time()
    digest = hashlib.sha256(blob).hexdigest()
    sock.sendall(p.encode_frame(p.BlobHeader(size=size, sha256=digest)))
    view = memoryview(blob)
    for off in range(0, size, CHUNK):
        sock.sendall(view[off : off + CHUNK])
    assert _recv_exact(sock, 2) == b"ok"
    peak = _mem_peak()
    sock.close()
    out.put(("send", start, base, peak, "tcp"))


# ---------------------------------------------------------------------------- driver


def run_once(kind: str, size: int, directory: str, timeout: float) -> dict:
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    out: mp.Queue = ctx.Queue()
    recv_fn, send_fn = (
        (_iroh_receiver, _iroh_sender) if kind == "iroh" else (_tcp_receiver, _tcp_sender)
    )
    procs = [
        ctx.Process(target=recv_fn, args=(q, out, directory)),
        ctx.Process(target=send_fn, args=(q, out, size)),
    ]
    for proc in procs:
        proc.start()
    try:
        results = {}
        for _ in range(2):
            role, t, base, peak, extra = out.get(timeout=timeout)
            results[role] = (t, base, peak, extra)
        for proc in procs:
            proc.join(timeout=30)
            if proc.exitcode != 0:
                raise RuntimeError(f"{kind} {proc.name} exited with {proc.exitcode}")
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    start, send_base, send_peak, info = results["send"]
    done, recv_base, recv_peak, got = results["recv"]
    assert got == size
    seconds = max(done - start, 1e-9)
    return {
        "mbps": size / MiB / seconds,
        "seconds": seconds,
        "send_rss": (send_peak - send_base) / 1024,
        "recv_rss": (recv_peak - recv_base) / 1024,
        "info": info,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="1,64,512", help="blob sizes in MiB, comma-separated")
    ap.add_argument("--repeat", type=int, default=3, help="runs per size and transport (median)")
    ap.add_argument("--dir", default=None, help="where receivers write (default /dev/shm or tmp)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per run")
    args = ap.parse_args(argv)
    sizes = [int(float(s) * MiB) for s in args.sizes.split(",") if s.strip()]
    base_dir = args.dir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="drift-bench-", dir=base_dir) as directory:
        for size in sizes:
            runs = {
                k: [run_once(k, size, directory, args.timeout) for _ in range(args.repeat)]
                for k in ("iroh", "tcp")
            }
            rows.append((size, runs))
    print(f"{'size':>9} | {'iroh MB/s':>10} | {'tcp MB/s':>10} | {'ratio':>6} | iroh runs (MB/s)")
    print("-" * 72)
    for size, runs in rows:
        iroh = statistics.median(r["mbps"] for r in runs["iroh"])
        tcp = statistics.median(r["mbps"] for r in runs["tcp"])
        each = ", ".join(f"{r['mbps']:.0f}" for r in runs["iroh"])
        print(f"{size / MiB:>6g} MB | {iroh:>10.0f} | {tcp:>10.0f} | {iroh / tcp:>6.2f} | {each}")
    size, runs = rows[-1]
    write_path = runs["iroh"][0]["info"]
    send_rss = max(r["send_rss"] for r in runs["iroh"])
    recv_rss = max(r["recv_rss"] for r in runs["iroh"])
    print(
        f"peak RSS above baseline at {size / MiB:g} MB (worst of {args.repeat}): "
        f"iroh sender {send_rss:.0f} MB, iroh receiver {recv_rss:.0f} MB "
        f"(write path: {write_path})"
    )
    iroh = statistics.median(r["mbps"] for r in runs["iroh"])
    tcp = statistics.median(r["mbps"] for r in runs["tcp"])
    print(f"transfer: iroh {iroh:.0f} MB/s, tcp {tcp:.0f} MB/s, ratio {iroh / tcp:.2f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
