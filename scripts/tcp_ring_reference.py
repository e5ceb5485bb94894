"""Measures what plain TCP streams move around a ring on this machine: WORLD processes on
loopback, each streaming BYTES to the next with blocking sends (one thread) while it receives
as much from the previous one (another thread) — no framing, no sums. The per-rank rate is in
the units of an all-reduce's busbw (bytes each rank sends per second), so run beside
`elbo bench allreduce` and gloo it shows how far the machine itself allows them to go, and how
fast the machine is at the moment (it varies by tens of percent here). It is a reference, not
a hard ceiling: one Python call per chunk is slower than a tuned event loop.

Usage: python3 scripts/tcp_ring_reference.py [WORLD [BYTES [CHUNK]]]   (defaults: 4, 1.5e9, 262144)
"""
import multiprocessing as mp
import socket
import sys
import threading
import time

# Longest a rank waits for the others to start or for a peer's bytes (a failed rank ends the
# run with an error instead of a hang).
WAIT_S = 60


def usage(problem):
    sys.exit(f"{problem}\nusage: python3 scripts/tcp_ring_reference.py [WORLD [BYTES [CHUNK]]]")


def number(text, name, low):
    try:
        value = int(float(text))
    except ValueError:
        usage(f"{name} {text!r}: expected a number")
    if value < low:
        usage(f"{name} {value}: expected at least {low}")
    return value


def rank(r, world, total, chunk, ports, barrier, results):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(WAIT_S)
    ports[r] = listener.getsockname()[1]
    barrier.wait(WAIT_S)
    out = socket.create_connection(("127.0.0.1", ports[(r + 1) % world]), timeout=WAIT_S)
    out.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    incoming, _ = listener.accept()
    incoming.settimeout(WAIT_S)
    payload = bytearray(chunk)
    inbox = memoryview(bytearray(chunk))
    barrier.wait(WAIT_S)
    start = time.perf_counter()

    def send():
        for _ in range(total // chunk):
            out.sendall(payload)

    sender = threading.Thread(target=send)
    sender.start()
    got = 0
    while got < total // chunk * chunk:
        n = incoming.recv_into(inbox)
        if n == 0:
            raise RuntimeError(f"rank {r}: the previous rank closed its stream early")
        got += n
    sender.join()
    results[r] = got / (time.perf_counter() - start)
    out.close()
    incoming.close()
    listener.close()


def main():
    args = sys.argv[1:]
    if len(args) > 3:
        usage(f"{len(args)} arguments: expected at most 3")
    world = number(args[0], "WORLD", 2) if len(args) > 0 else 4
    total = number(args[1], "BYTES", 1) if len(args) > 1 else 1_500_000_000
    chunk = number(args[2], "CHUNK", 1) if len(args) > 2 else 262_144
    if chunk > total:
        usage(f"CHUNK {chunk} is larger than BYTES {total}")
    with mp.Manager() as manager:
        ports = manager.list([0] * world)
        results = manager.list([0.0] * world)
        barrier = manager.Barrier(world)
        procs = [
            mp.Process(target=rank, args=(r, world, total, chunk, ports, barrier, results))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        try:
            for p in procs:
                p.join()
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
        if any(p.exitcode != 0 for p in procs):
            sys.exit("a rank failed (see above)")
        slowest = min(results)
        print(
            f"tcp ring world={world} bytes={total} chunk={chunk} "
            f"per-rank={slowest / 1e9:.3f}GB/s (the slowest rank's receive rate)"
        )


if __name__ == "__main__":
    main()
