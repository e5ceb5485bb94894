"""The kill loop: a run of 3 workers trains for MINUTES while a random worker is killed about
every KILL_EVERY seconds (mostly SIGKILL; sometimes SIGSTOP, which freezes it with its connections
open until the heartbeat timeout drops it, then SIGKILL) and a replacement with a new id joins,
and the coordinator is SIGKILLed and restarted on the same port and run directory about every
COORDINATOR_EVERY seconds (it resumes the newest checkpoint; the workers reconnect). At the end
the coordinator is drained with SIGTERM (a checkpoint at a step boundary).

Then it checks, and fails (exit 1) if any check fails:
- every row is used exactly once in every completed epoch and at most once in the last one (the
  workers' --audit-rows files; a step redone after a fault counts in the generation that
  completed it);
- the replicas never differed (cluster.checksum_every = 1: every step's parameter checksums of
  all ranks are compared; a difference fails the run) and the run was drained, not failed;
- it reports p50/p95 of detection (kill -> the coordinator declares the worker lost), ring
  re-form (kill -> the next generation's ring formed) and next step (kill -> the next committed
  step), the coordinator restarts' time to the next committed step, and goodput (committed steps
  times the median undisturbed step time, divided by wall time).

Usage: python3 scripts/kill_loop.py [--minutes 20] [--elbo target/release/elbo] [--seed 0]
                                   [--kill-every 15] [--coordinator-every 240]
"""
import argparse
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

ANSI = re.compile(r"\x1b\[[0-9;]*m")
RUN = ["--set", "data.sprites.n=2000", "--set", "data.sprites.size=32", "--set", "model.hidden=128",
       "--set", "train.batch_size=64", "--set", "train.epochs=100000", "--set", "train.log_every=1",
       "--set", "train.checkpoint_every=25", "--set", "eval.every=1000000000",
       "--set", "cluster.workers=3", "--set", "cluster.min_workers=1",
       "--set", "cluster.heartbeat_timeout_s=1", "--set", "cluster.step_timeout_s=10",
       "--set", "cluster.rendezvous_timeout_s=2", "--set", "cluster.checksum_every=1",
       "--set", "cluster.reconnect_timeout_s=60", "--set", "cluster.restart_workers=false"]


def stamp(line):
    """Epoch seconds of a tracing log line."""
    return datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()


def pct(xs, q):
    """The q-quantile of xs (nearest rank)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


class Run:
    def __init__(self, args, tmp):
        self.args, self.tmp = args, tmp
        self.elbo = args.elbo
        self.run_dir = os.path.join(tmp, "run")
        self.audit = os.path.join(tmp, "audit")
        os.makedirs(self.audit)
        self.log = open(os.path.join(tmp, "coordinator.log"), "w+")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.listen = f"127.0.0.1:{probe.getsockname()[1]}"
        self.env = dict(os.environ, ELBO_TOKEN="kill-loop", ELBO_CACHE_DIR=os.path.join(tmp, "cache"))
        self.coordinator = None
        self.workers = {}  # id -> Popen
        self.next_id = 0

    def start_coordinator(self):
        self.coordinator = subprocess.Popen(
            [self.elbo, "coordinator", "--listen", self.listen, "--run-dir", self.run_dir, *RUN],
            stdout=subprocess.DEVNULL, stderr=self.log,
            env=dict(self.env, ELBO_LOG="info,elbo_coordinator::service=warn"))

    def start_worker(self):
        wid = f"w{self.next_id}"
        self.next_id += 1
        self.workers[wid] = subprocess.Popen(
            [self.elbo, "worker", "--coordinator", f"http://{self.listen}", "--run-id", "default",
             "--worker-id", wid, "--audit-rows", self.audit, "--connect-timeout-s", "60"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=dict(self.env, ELBO_LOG="error", RAYON_NUM_THREADS="1"))
        return wid

    def committed(self):
        try:
            with open(os.path.join(self.run_dir, "metrics.jsonl")) as f:
                return sum('"loss"' in line for line in f)
        except FileNotFoundError:
            return 0

    def stop_all(self):
        for p in [self.coordinator, *self.workers.values()]:
            if p and p.poll() is None:
                p.kill()
                p.wait()


def lines_of(log):
    """The log's tracing lines, colour codes removed."""
    log.flush()
    log.seek(0)
    return [ANSI.sub("", line) for line in log if line[:4].isdigit()]


def audit(run):
    """Rows per epoch from the audit files: for each step the rows of the newest generation that
    trained it, up to the last committed step."""
    records = [json.loads(l) for l in open(os.path.join(run.run_dir, "metrics.jsonl")) if '"loss"' in l]
    last = max(r["step"] for r in records)
    per_epoch = min(r["step"] for r in records if r["epoch"] == 1)
    by_step = {}
    for name in os.listdir(run.audit):
        for line in open(os.path.join(run.audit, name)):
            g, s, row = map(int, line.split())
            if s >= last:
                continue
            slot = by_step.setdefault(s, [g, []])
            if g > slot[0]:
                slot[:] = [g, []]
            if g == slot[0]:
                slot[1].append(row)
    missing = [s for s in range(last) if s not in by_step]
    epochs = {}
    for s, (_, rows) in by_step.items():
        epochs.setdefault(s // per_epoch, []).extend(rows)
    complete = last // per_epoch
    full = set(epochs.get(0, []))
    problems = []
    if missing:
        problems.append(f"{len(missing)} committed steps without audited rows (first {missing[:5]})")
    for e, rows in sorted(epochs.items()):
        if len(rows) != len(set(rows)):
            problems.append(f"epoch {e}: {len(rows) - len(set(rows))} rows used twice")
        if e < complete and set(rows) != full:
            problems.append(f"epoch {e}: {len(full ^ set(rows))} rows differ from epoch 0's")
    return last, complete, len(full), problems


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--elbo", default="target/release/elbo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kill-every", type=float, default=15)
    ap.add_argument("--coordinator-every", type=float, default=240)
    args = ap.parse_args()
    if args.minutes <= 0 or args.kill_every <= 1 or args.coordinator_every <= args.kill_every:
        sys.exit("expected --minutes > 0, --kill-every > 1 and --coordinator-every > --kill-every")
    rng = random.Random(args.seed)
    faults, restarts = [], []  # (time, worker, kind), restart times
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(args, tmp)
        try:
            run.start_coordinator()
            for _ in range(3):
                run.start_worker()
            while run.committed() < 20:
                time.sleep(0.05)
            first = run.committed()
            start = time.time()
            end = start + 60 * args.minutes
            next_kill = start + rng.uniform(0.5, 1.5) * args.kill_every
            next_restart = start + rng.uniform(0.75, 1.25) * args.coordinator_every
            while time.time() < end:
                time.sleep(0.05)
                now = time.time()
                if now >= next_restart:
                    run.coordinator.kill()
                    run.coordinator.wait()
                    restarts.append(time.time())
                    run.start_coordinator()
                    next_restart = now + rng.uniform(0.75, 1.25) * args.coordinator_every
                    next_kill = max(next_kill, now + 5)
                elif now >= next_kill:
                    live = sorted(w for w, p in run.workers.items() if p.poll() is None)
                    victim = rng.choice(live)
                    proc = run.workers[victim]
                    kind = "SIGSTOP" if rng.random() < 0.25 else "SIGKILL"
                    faults.append((time.time(), victim, kind))
                    if kind == "SIGSTOP":
                        proc.send_signal(signal.SIGSTOP)
                        time.sleep(3)  # past the 1 s heartbeat timeout: dropped while frozen
                    proc.kill()
                    proc.wait()
                    run.start_worker()
                    next_kill = time.time() + rng.uniform(0.5, 1.5) * args.kill_every
            wall = time.time() - start
            run.coordinator.send_signal(signal.SIGTERM)
            code = run.coordinator.wait(timeout=120)
        finally:
            run.stop_all()
        lines = lines_of(run.log)
        last, complete, rows, problems = audit(run)
        if code != 143:
            problems.append(f"the drained coordinator exited {code}, expected 143")
        problems += [l.strip() for l in lines if "diverged" in l]
        progress = [(stamp(l), json.loads(l.split("progress: ", 1)[1])) for l in lines
                    if "elbo_engine::progress" in l]
        formed = [stamp(l) for l in lines if "ring formed" in l]
        detect, reform, step = [], [], []
        for t, victim, kind in faults:
            lost = next((stamp(l) for l in lines
                         if "worker lost" in l and f"worker={victim} " in l and stamp(l) >= t), None)
            if lost is None:
                continue  # lost to a coordinator restart in between
            f = next((x for x in formed if x >= lost), None)
            s = next((x for x, _ in progress if f is not None and x >= f), None)
            detect.append(lost - t)
            if f is not None and s is not None:
                reform.append(f - t)
                step.append(s - t)
        back = [s - t for t in restarts for s in [next((x for x, _ in progress if x > t), None)] if s]
        gaps = [b - a for (a, ra), (b, rb) in zip(progress, progress[1:]) if rb["step"] == ra["step"] + 1]
        typical = statistics.median(gaps) if gaps else float("nan")
        done = last - first
        kinds = {k: sum(1 for f in faults if f[2] == k) for k in ("SIGKILL", "SIGSTOP")}
        print(f"kill loop: {wall / 60:.1f} min, {len(faults)} worker faults ({kinds['SIGKILL']} SIGKILL, "
              f"{kinds['SIGSTOP']} SIGSTOP), {len(restarts)} coordinator restarts, {run.next_id} workers started")
        print(f"run: {last} steps committed, {complete} complete epochs of {rows} rows, audited")
        ms = lambda xs: f"p50 {1e3 * pct(xs, 0.5):.0f} ms, p95 {1e3 * pct(xs, 0.95):.0f} ms (n={len(xs)})"
        print(f"detection (kill -> worker lost):           {ms(detect)}")
        print(f"ring re-formed (kill -> ring formed):      {ms(reform)}")
        print(f"next step (kill -> next committed step):   {ms(step)}")
        print(f"coordinator restart -> next committed step: {ms(back)}")
        print(f"goodput: {done} steps x {1e3 * typical:.1f} ms (median step) / {wall:.0f} s wall = "
              f"{done * typical / wall:.2f}")
        for p in problems:
            print(f"FAILED: {p}")
        sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
