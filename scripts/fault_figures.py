"""Measures elbo's fault-tolerance figures on this machine, with the release binary:

- detection latency and time to recover (fault -> first step committed by the re-formed ring)
  when one of 3 local workers is SIGKILLed, and when one is frozen with SIGSTOP (silent, its
  connections open: what a network cut looks like) under a 1 s and the default 5 s heartbeat
  timeout;
- the same for a real network cut (`cut`, needs root): one worker runs in a network namespace
  joined by a veth pair whose link is taken down; then the link is mended and the time until the
  worker is back in the ring (world 3 again) is measured too;
- the step-time overhead of checkpoints (checkpoint_every = 10 vs only the final one), in one
  process and with 3 workers.

Usage: python3 scripts/fault_figures.py [REPEATS [faults|cut|checkpoints]...]   (after cargo build --release)
"""
import datetime
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ELBO = os.environ.get("ELBO", "target/release/elbo")
ALL_PARTS = ["faults", "cut", "checkpoints"]
REPEATS = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else None
PARTS = sys.argv[2:] or ALL_PARTS
if len(sys.argv) > 1 and not REPEATS or not set(PARTS) <= set(ALL_PARTS):
    sys.exit(f"usage: {sys.argv[0]} [REPEATS (a positive whole number) [{'|'.join(ALL_PARTS)}]...]; "
             f"got {' '.join(sys.argv[1:])!r}")
REPEATS = REPEATS or 5
COMMON = ["--set", "train.log_every=1", "--set", "train.epochs=3", "--set", "train.checkpoint_every=100000"]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
RNG = random.Random(0)


def stamp(line):
    """Epoch seconds of a tracing log line."""
    ts = line.split()[0]
    return datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def children(pid):
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(p))
            except (OSError, IndexError, ValueError):
                pass
    return out


def worker_pid(launcher, worker_id):
    for c in children(launcher):
        try:
            with open(f"/proc/{c}/cmdline", "rb") as f:
                if worker_id.encode() in f.read().split(b"\0"):
                    return c
        except OSError:
            pass
    raise RuntimeError(f"{worker_id} not found")


def events(log):
    """From a coordinator's log: when the worker was declared lost, when generation 2's ring
    formed, and each committed step as (time, record)."""
    log.seek(0)
    lines = [ANSI.sub("", l) for l in log]
    lost = next(stamp(l) for l in lines if "worker lost" in l)
    formed = next(stamp(l) for l in lines if "ring formed" in l and "generation=2" in l)
    steps = [(stamp(l), json.loads(l.split("progress: ", 1)[1])) for l in lines if "elbo_engine::progress" in l]
    return lost, formed, steps


def report(title, runs, labels):
    print(f"{title}, {REPEATS} runs (ms):")
    for i, label in enumerate(labels):
        print(f"  {label + ':':<42} {spread([r[i] for r in runs])}")


def fault(sig, heartbeat):
    """One run of 3 workers; worker-1 gets `sig` at a random committed step in [60, 240)."""
    with tempfile.TemporaryDirectory() as tmp:
        log = open(os.path.join(tmp, "log"), "w+")
        env = dict(os.environ, ELBO_LOG="info,elbo_engine::worker=warn")
        args = [ELBO, "train", "--run-dir", os.path.join(tmp, "run"), *COMMON,
                "--set", "cluster.workers=3", "--set", "cluster.min_workers=2",
                "--set", "cluster.restart_workers=false",
                "--set", f"cluster.heartbeat_timeout_s={heartbeat}", "--max-steps", "400"]
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, env=env,
                             start_new_session=True)
        metrics = os.path.join(tmp, "run", "metrics.jsonl")
        at = RNG.randrange(60, 240)
        while not os.path.exists(metrics) or sum('"loss"' in l for l in open(metrics)) < at:
            time.sleep(0.005)
        victim = worker_pid(p.pid, "worker-1")
        t_fault = time.time()
        os.kill(victim, sig)
        p.wait(timeout=120)
        try:
            os.kill(victim, signal.SIGKILL)  # a frozen worker outlives nothing
        except ProcessLookupError:
            pass
        lost, formed, steps = events(log)
        first = next(t for t, r in steps if r["world"] == 2)
        before = [t for t, r in steps if r["world"] == 3]
        step_s = statistics.median(b - a for a, b in zip(before[20:], before[21:]))
        return lost - t_fault, formed - t_fault, first - t_fault, step_s


def ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True)


def cut(heartbeat):
    """Coordinator and 2 workers here, worker w2 in a network namespace; its link goes down at a
    random committed step in [60, 240) and comes back up after 3 steps without it."""
    pid = os.getpid()
    ns, host_if, inside_if = f"elbo-fig-{pid}", f"elbo{pid}h", f"elbo{pid}n"
    base = (198 << 24) + (18 << 16) + (pid % 32768) * 4  # 198.18.0.0/15: never routed
    host, inside = (".".join(str((base + k) >> s & 255) for s in (24, 16, 8, 0)) for k in (1, 2))
    procs = []
    ip("netns", "add", ns)
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", inside_if, "netns", ns)
        ip("addr", "add", f"{host}/30", "dev", host_if)
        ip("-n", ns, "addr", "add", f"{inside}/30", "dev", inside_if)

        def links(state):
            ip("link", "set", host_if, state)
            ip("-n", ns, "link", "set", inside_if, state)

        links("up")
        with tempfile.TemporaryDirectory() as tmp:
            log = open(os.path.join(tmp, "log"), "w+")
            env = dict(os.environ, ELBO_LOG="info,elbo_engine::worker=warn", ELBO_TOKEN="figures")
            with socket.socket() as probe:  # a port free on the link's address right now
                probe.bind((host, 0))
                listen = f"{host}:{probe.getsockname()[1]}"
            procs.append(subprocess.Popen(
                [ELBO, "coordinator", "--listen", listen, "--run-dir", os.path.join(tmp, "run"), *COMMON,
                 "--set", "cluster.workers=3", "--set", "cluster.min_workers=2",
                 "--set", f"cluster.heartbeat_timeout_s={heartbeat}", "--max-steps", "600"],
                stdout=subprocess.DEVNULL, stderr=log, env=env))
            for wid, prefix, addr in [("w0", [], host), ("w1", [], host), ("w2", ["ip", "netns", "exec", ns], inside)]:
                procs.append(subprocess.Popen(
                    [*prefix, ELBO, "worker", "--coordinator", f"http://{listen}", "--run-id", "default",
                     "--worker-id", wid, "--listen", f"{addr}:0"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(env, ELBO_LOG="warn")))
            metrics = os.path.join(tmp, "run", "metrics.jsonl")

            def worlds():
                try:
                    rows = [json.loads(l) for l in open(metrics) if l.endswith("\n")]
                    return [r["world"] for r in rows if "world" in r]
                except FileNotFoundError:
                    return []

            at = RNG.randrange(60, 240)
            while len(worlds()) < at:
                time.sleep(0.005)
            t_cut = time.time()
            links("down")
            while worlds().count(2) < 3:
                time.sleep(0.005)
            t_mend = time.time()
            links("up")
            procs[0].wait(timeout=120)
            lost, formed, steps = events(log)
            first = next(t for t, r in steps if r["world"] == 2)
            back = next(t for t, r in steps if t > t_mend and r["world"] == 3)
            return lost - t_cut, formed - t_cut, first - t_cut, back - t_mend
    finally:
        for p in procs:
            p.kill()
            p.wait()
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def timed(extra):
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([ELBO, "train", "--run-dir", tmp, "--max-steps", "400", *COMMON, *extra],
                             capture_output=True, text=True, check=True,
                             env=dict(os.environ, ELBO_LOG="warn")).stdout
        return float(re.search(r"in ([0-9.]+) s", out).group(1))


def spread(xs, unit=1000.0, fmt="{:.1f}"):
    xs = sorted(x * unit for x in xs)
    return f"median {fmt.format(statistics.median(xs))} (min {fmt.format(xs[0])}, max {fmt.format(xs[-1])})"


for name, sig, hb in [] if "faults" not in PARTS else [("SIGKILL", signal.SIGKILL, 5), ("SIGSTOP", signal.SIGSTOP, 1), ("SIGSTOP", signal.SIGSTOP, 5)]:
    report(f"{name}, heartbeat timeout {hb} s", [fault(sig, hb) for _ in range(REPEATS)],
           ["detection (fault -> worker declared lost)", "ring re-formed (fault -> generation 2)",
            "recovery (fault -> next committed step)", "normal step time before the fault"])

for hb in [] if "cut" not in PARTS else [1, 5]:
    report(f"network cut, heartbeat timeout {hb} s", [cut(hb) for _ in range(REPEATS)],
           ["detection (cut -> worker declared lost)", "ring re-formed (cut -> generation 2)",
            "recovery (cut -> next committed step)", "rejoined (link mended -> world 3 again)"])

for label, world in [] if "checkpoints" not in PARTS else [("1 process", []), ("3 workers", ["--set", "cluster.workers=3"])]:
    base = [timed(world) for _ in range(REPEATS)]
    ck = [timed([*world, "--set", "train.checkpoint_every=10"]) for _ in range(REPEATS)]
    b, c = statistics.median(base), statistics.median(ck)
    print(f"checkpoints every 10 steps, {label}, 400 steps: {c:.2f} s vs {b:.2f} s with only the final one "
          f"-> {(c - b) / 39 * 1000:.1f} ms per checkpoint, {100 * (c - b) / b:.1f} % of training time")
