#!/usr/bin/env python3
"""Runs the pods of deploy/overlays/cpu as a kubelet and the Job controller would, on this
machine, and checks that the run they make finishes — through a worker evicted and replaced, and
the coordinator evicted and replaced.

    scripts/k8s_pods_test.py ELBO PYTHON_WITH_PYYAML     (root: it makes network namespaces)

The overlay is rendered by `kubectl kustomize` through a test overlay that only shrinks the run
(a smaller config, 3 workers: `configMapGenerator` merge into `elbo-run`), then every pod is
started from its rendered spec:

- its own network namespace with its own pod IP on a bridge (a "cluster" namespace holds it),
  /etc/hosts there resolving the Services to the pods they select (`ip netns exec` mounts it);
- the container's env from the spec (values, ConfigMap keys, the `elbo-token` Secret the README
  says to create, downward-API `metadata.name` and `status.podIP`), `JOB_COMPLETION_INDEX` for
  Indexed Jobs and the Service links a kubelet injects; `$(VAR)` in args expanded from it;
- volumes (ConfigMap items, emptyDir, the PVC) as host directories: a path under a volume's
  mountPath in the args or env is rewritten to that directory (the one liberty taken: no mount
  namespace), the PVC's directory outliving pods.

An eviction is SIGTERM, then SIGKILL after the pod's terminationGracePeriodSeconds; the Job
controller's answer is emulated from the Job's podFailurePolicy (DisruptionTarget: ignored, a
replacement with the same index and a new name). Probes and resource limits are not emulated.
Exits non-zero, naming what went wrong, if any pod fails or the run does not finish (the pods'
logs are printed then, and kept in $ELBO_PODS_TEST_LOGS when it is set).
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ELBO = os.path.abspath(sys.argv[1])
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
LIMIT_S = 300
WORKERS = 3
SUBNET = "10.213.7"
TAG = f"ep{os.getpid() % 100000}"

yaml_loader = sys.argv[2]


def sh(*args, check=True, **kw):
    return subprocess.run(list(args), check=check, capture_output=True, text=True, **kw)


def render():
    """The cpu overlay, shrunk by a test overlay inside the repository (kustomize refuses paths
    outside the root it is given)."""
    work = os.path.join(REPO, "target", "k8s-pods-test")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    with open(os.path.join(REPO, "deploy", "base", "run.toml")) as f:
        config = f.read()
    config = re.sub(r"(?m)^n = \d+", "n = 6000", config)
    config = re.sub(r"(?m)^epochs = \d+", "epochs = 8", config)
    config = re.sub(r"(?m)^batch_size = \d+", "batch_size = 128\nlog_every = 1", config)
    # Long enough to interrupt twice (~340 steps), short enough for CI.
    config += "\n[cluster]\nheartbeat_timeout_s = 3.0\n"
    with open(os.path.join(work, "run.toml"), "w") as f:
        f.write(config)
    with open(os.path.join(work, "kustomization.yaml"), "w") as f:
        f.write(
            "resources: [../../deploy/overlays/cpu]\n"
            "components: [../../deploy/components/run-shape]\n"
            "configMapGenerator:\n"
            "  - name: elbo-run\n"
            "    behavior: merge\n"
            "    files: [config.toml=run.toml]\n"
            f"    literals: [workers={WORKERS}]\n"
        )
    text = sh("kubectl", "kustomize", work).stdout
    out = sh(yaml_loader, "-c",
             "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
             input=text).stdout
    return json.loads(out)


class Cluster:
    def __init__(self, objects, root):
        self.root = root
        self.objects = objects
        self.configmaps = {o["metadata"]["name"]: o.get("data", {})
                           for o in objects if o["kind"] == "ConfigMap"}
        # What the README says to create: kubectl create secret generic elbo-token ...
        self.secrets = {"elbo-token": {"token": "pods-test-token"}}
        self.services = [o for o in objects if o["kind"] == "Service"]
        self.pvcs = {o["metadata"]["name"]: os.path.join(root, "pvc", o["metadata"]["name"])
                     for o in objects if o["kind"] == "PersistentVolumeClaim"}
        for d in self.pvcs.values():
            os.makedirs(d)
            os.chmod(d, 0o777)
        self.pods = {}
        self.ips = {}
        self.next_ip = 20
        self.cluster_ns = f"{TAG}-c"
        sh("ip", "netns", "add", self.cluster_ns)
        sh("ip", "netns", "exec", self.cluster_ns, "ip", "link", "add", "br0", "type", "bridge")
        sh("ip", "netns", "exec", self.cluster_ns, "ip", "link", "set", "br0", "up")
        sh("ip", "netns", "exec", self.cluster_ns, "ip", "link", "set", "lo", "up")

    def job(self, name):
        return next(o for o in self.objects if o["kind"] == "Job" and o["metadata"]["name"] == name)

    def start(self, job_name, index=None, ip=None):
        """Starts a pod of `job_name` (its `index` for an Indexed Job), at `ip` or a new one."""
        job = self.job(job_name)
        spec = job["spec"]["template"]["spec"]
        labels = job["spec"]["template"]["metadata"].get("labels", {})
        suffix = "".join(random.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5))
        name = f"{job_name}-{index}-{suffix}" if index is not None else f"{job_name}-{suffix}"
        if ip is None:
            ip = f"{SUBNET}.{self.next_ip}"
            self.next_ip += 1
        n = len(self.pods)
        ns, host_if, pod_if = f"{TAG}-p{n}", f"{TAG}h{n}", f"{TAG}p{n}"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", host_if, "netns", self.cluster_ns, "type", "veth",
           "peer", "name", pod_if, "netns", ns)
        sh("ip", "netns", "exec", self.cluster_ns, "ip", "link", "set", host_if, "master", "br0", "up")
        for cmd in (["ip", "addr", "add", f"{ip}/24", "dev", pod_if],
                    ["ip", "link", "set", pod_if, "up"], ["ip", "link", "set", "lo", "up"]):
            sh("ip", "netns", "exec", ns, *cmd)
        os.makedirs(f"/etc/netns/{ns}", exist_ok=True)
        pod = {"name": name, "job": job_name, "index": index, "ip": ip, "ns": ns,
               "labels": labels, "grace": spec.get("terminationGracePeriodSeconds", 30)}
        self.pods[name] = pod
        self.write_hosts()
        (container,) = spec["containers"]
        dirs = self.volumes(spec, name)
        mounts = sorted(((m["mountPath"], dirs[m["name"]]) for m in container.get("volumeMounts", [])),
                        key=lambda m: -len(m[0]))

        def mapped(value):
            """`value`, or `--flag=value`, with a path under a mount moved to its directory."""
            flag, eq, rest = value.partition("=") if value.startswith("--") else ("", "", value)
            for path, d in mounts:
                if rest == path or rest.startswith(path + "/"):
                    return flag + eq + d + rest[len(path):]
            return value

        env = {"PATH": "/usr/bin:/bin", "HOSTNAME": name}
        if index is not None:
            env["JOB_COMPLETION_INDEX"] = str(index)
        env.update(self.service_links())
        for e in container.get("env", []):
            env[e["name"]] = mapped(self.env_value(e, pod))
        if "/tmp" in dict(mounts):
            env["TMPDIR"] = dict(mounts)["/tmp"]

        def expand(arg):
            return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                          lambda m: env.get(m.group(1), m.group(0)), arg)

        args = [mapped(expand(a)) for a in container.get("args", [])]
        log = open(os.path.join(self.root, f"{name}.log"), "w")
        pod["log"] = log.name
        pod["proc"] = subprocess.Popen(["ip", "netns", "exec", ns, ELBO, *args], env=env,
                                       stdout=log, stderr=subprocess.STDOUT,
                                       cwd=dirs.get("tmp", self.root), start_new_session=True)
        print(f"  started {name} at {ip}: elbo {' '.join(args)}", flush=True)
        return pod

    def volumes(self, spec, pod_name):
        dirs = {}
        for v in spec.get("volumes", []):
            d = os.path.join(self.root, pod_name, v["name"])
            if "configMap" in v:
                os.makedirs(d)
                data = self.configmaps[v["configMap"]["name"]]
                items = v["configMap"].get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    with open(os.path.join(d, item["path"]), "w") as f:
                        f.write(data[item["key"]])
            elif "emptyDir" in v:
                os.makedirs(d)
                os.chmod(d, 0o777)
            elif "persistentVolumeClaim" in v:
                d = self.pvcs[v["persistentVolumeClaim"]["claimName"]]
            else:
                raise SystemExit(f"error: volume {v['name']}: only configMap, emptyDir and PVCs are emulated")
            dirs[v["name"]] = d
        return dirs

    def env_value(self, e, pod):
        if "value" in e:
            return e["value"]
        src = e["valueFrom"]
        if "configMapKeyRef" in src:
            ref = src["configMapKeyRef"]
            return self.configmaps[ref["name"]][ref["key"]]
        if "secretKeyRef" in src:
            ref = src["secretKeyRef"]
            return self.secrets[ref["name"]][ref["key"]]
        field = src["fieldRef"]["fieldPath"]
        return {"metadata.name": pod["name"], "status.podIP": pod["ip"],
                "metadata.namespace": "default"}[field]

    def service_ip(self, service):
        """A Service with a cluster IP stands for its pod here (one pod behind each)."""
        pods = [p for p in self.pods.values() if not p.get("gone")
                and all(p["labels"].get(k) == v for k, v in service["spec"].get("selector", {}).items())]
        return pods[-1]["ip"] if pods else None

    def write_hosts(self):
        lines = ["127.0.0.1 localhost"]
        for s in self.services:
            ip = self.service_ip(s)
            if ip:
                n = s["metadata"]["name"]
                lines.append(f"{ip} {n} {n}.default.svc {n}.default.svc.cluster.local")
        for p in self.pods.values():
            with open(f"/etc/netns/{p['ns']}/hosts", "w") as f:
                f.write("\n".join(lines + [f"{p['ip']} {p['name']}"]) + "\n")

    def service_links(self):
        env = {}
        for s in self.services:
            if s["spec"].get("clusterIP") == "None":
                continue
            ip = self.service_ip(s) or "0.0.0.0"
            base = s["metadata"]["name"].upper().replace("-", "_")
            ports = s["spec"]["ports"]
            env[f"{base}_SERVICE_HOST"] = ip
            env[f"{base}_SERVICE_PORT"] = str(ports[0]["port"])
            env[f"{base}_PORT"] = f"tcp://{ip}:{ports[0]['port']}"
            for p in ports:
                env[f"{base}_SERVICE_PORT_{p['name'].upper()}"] = str(p["port"])
                env[f"{base}_PORT_{p['port']}_TCP"] = f"tcp://{ip}:{p['port']}"
        return env

    def evict(self, pod):
        """SIGTERM, then SIGKILL after the grace period; returns the exit code."""
        proc = pod["proc"]
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=pod["grace"])
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        pod["gone"] = True
        # The pod is deleted: its network namespace (and its IP) with it.
        sh("ip", "netns", "del", pod["ns"], check=False)
        code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
        print(f"  evicted {pod['name']}: exit {code}", flush=True)
        return code

    def close(self):
        for p in self.pods.values():
            proc = p.get("proc")
            if proc and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            sh("ip", "netns", "del", p["ns"], check=False)
            shutil.rmtree(f"/etc/netns/{p['ns']}", ignore_errors=True)
        sh("ip", "netns", "del", self.cluster_ns, check=False)


def committed(run_dir):
    """The last step logged in the run directory (`train.log_every` is 1 here)."""
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
    except (FileNotFoundError, ValueError):
        return 0
    return steps[-1] if steps else 0


def wait_for(what, cond, cluster):
    deadline = time.time() + LIMIT_S
    while not cond():
        for p in cluster.pods.values():
            if not p.get("gone") and p["proc"].poll() not in (None, 0):
                fail(f"{p['name']} exited {p['proc'].returncode} while waiting for {what}", cluster)
        if time.time() > deadline:
            fail(f"timed out waiting for {what}", cluster)
        time.sleep(0.1)


def fail(message, cluster):
    for p in cluster.pods.values():
        with open(p["log"]) as f:
            tail = f.read()[-3000:]
        print(f"--- {p['name']} ({p['ip']}):\n{tail}", file=sys.stderr)
    cluster.close()
    raise SystemExit(f"error: {message}")


def main():
    objects = render()
    root = tempfile.mkdtemp(prefix="elbo-pods-")
    os.chmod(root, 0o755)
    cluster = Cluster(objects, root)
    try:
        (run,) = [d for n, d in cluster.configmaps.items() if n.startswith("elbo-run")]
        run_dir = os.path.join(cluster.pvcs["elbo-runs"], run["run-id"])
        coordinator = cluster.start("elbo-coordinator")
        workers = cluster.job("elbo-workers")["spec"]
        assert workers["completions"] == WORKERS == workers["parallelism"], workers
        for i in range(WORKERS):
            cluster.start("elbo-workers", index=i)
        wait_for("step 15", lambda: committed(run_dir) >= 15, cluster)
        victim = next(p for p in cluster.pods.values() if p["index"] == 1)
        code = cluster.evict(victim)
        if code == 2:
            fail("an evicted worker exited 2 (its Job would fail)", cluster)
        cluster.start("elbo-workers", index=1)
        at = committed(run_dir)
        wait_for(f"step {at + 15} after the worker's replacement", lambda: committed(run_dir) >= at + 15, cluster)
        code = cluster.evict(coordinator)
        if code != 143:
            fail(f"the evicted coordinator exited {code}, not 143 (stopped, not finished)", cluster)
        stopped_at = committed(run_dir)
        cluster.start("elbo-coordinator", ip=coordinator["ip"])
        deadline = time.time() + LIMIT_S
        live = [p for p in cluster.pods.values() if not p.get("gone")]
        for p in live:
            try:
                p["proc"].wait(timeout=max(1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                fail(f"{p['name']} did not finish", cluster)
            if p["proc"].returncode != 0:
                fail(f"{p['name']} exited {p['proc'].returncode}", cluster)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            steps = [json.loads(line) for line in f if '"loss"' in line]
        total = steps[-1]["step"]
        final = os.path.join(run_dir, "checkpoints", f"step-{total:09d}", "model.safetensors")
        if not os.path.isfile(final):
            fail(f"no final checkpoint at step {total}", cluster)
        worlds = sorted({s.get("world") for s in steps})
        print(f"ok: the run finished at step {total} (coordinator replaced at step {stopped_at}, "
              f"worlds {worlds}); every live pod exited 0", flush=True)
    finally:
        cluster.close()
        if os.environ.get("ELBO_PODS_TEST_LOGS"):
            shutil.copytree(root, os.environ["ELBO_PODS_TEST_LOGS"], dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("cache", "pvc", "tmp", "config"))
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
