#!/usr/bin/env python3
"""Compare ulb-tcp with a direct connection and with HAProxy (mode tcp), on loopback, in one run.

    python3 benches/compare.py [--rounds 3] [--seconds 4] [--quick] [--only S2,redis] [--out BENCHMARKS.md]

Scenarios (each measured for every target, interleaved: for round: for scenario: for target):
  S1 bulk throughput, iperf3, 1 and 4 streams, both directions (Gbit/s)
  S2 connection rate, wrk -t1 and -t2 with "Connection: close" against nginx (requests/s), and the
     balancer's CPU per connection
  S3 keep-alive request rate, wrk -t1 and -t2, 50 connections, against nginx (requests/s), and the
     balancer's CPU per request
  S4 latency p50/p99/p99.9 at a fixed rate through an echo server (examples/latency_probe.rs)
  S5 memory per established idle connection (10,000 connections held, balancer RSS delta)
  S6 balancer CPU seconds per GB carried, during the S1 1-stream runs
  S7 redis-benchmark -t get,set -c 50, -P 16 and -P 1, against redis-server (GET and SET requests/s), and
     the balancer's CPU per request
  S8 system calls per connection of the balancer (strace -f -p) during a short wrk "Connection: close"
     run, for ulb-tcp and HAProxy 1t (--syscall-targets)
`--only` (alias `--scenarios`) picks scenarios: 'S1,S3', 'redis', 'syscalls', 'S2 wrk -t1'.

Targets: direct (client straight to the backend), ulb-tcp (default data path and runtime), ulb-tcp pooled, splice and
plain copy (only if the binary accepts `--copy-mode pooled` / `splice` / `plain`), ulb-tcp per-core or ulb-tcp work-stealing (the
`--runtime` that is not the default, if the binary has the flag), one row per `--variant` and per `--program`, HAProxy 2.6 mode tcp in
several variants (1/2 threads, splice on/off). `--skip` leaves targets out. Each balancer is started fresh for every single measurement and stopped after it.
The target order rotates: in round r (from 1) the targets start at position r - 1, so that no target always
follows `direct` (that position lost about 8% of its connection rate).

Figures: medians over rounds with their spread; ratios to direct and to HAProxy's best variant, unpaired
(median / median) and paired (per round, ulb-tcp / the HAProxy variant with the best median over the run,
in that same round: median of the per-round ratios with min-max).

Machine CPU per connection and per request (S2, S3, S7): busy CPU of the whole machine (user, nice, system,
irq, softirq from /proc/stat) during the run, less the user-space processes that are not ours, per request:
client, backend, balancer, the softirq work of loopback TCP and kernel threads (the kworkers of a sockmap
splice) all count. It is the figure that cannot be shifted out of the balancer's process; `direct` gives the
client's and backend's share.

Foreign load: for each measurement the CPU used by processes that are not this script or its descendants is
read from /proc (shown in the report); `--gate-foreign-cpu 0.15` redoes a measurement during which they used
more than 0.15 cores, at most `--gate-redos` (2) times.

Everything runs on 127.0.0.1 with ports chosen free by the kernel; every process started is stopped and
waited for, and the temporary directory is removed, also on errors and Ctrl-C. A failed measurement is
reported (scenario, target, round, reason) and shown as "fail"; the others go on.

Installs haproxy, nginx, wrk, iperf3, redis-server, redis-tools and strace from Debian when missing and
running as root. Builds ulb-tcp and the probe in release (`cargo build --release --bin ulb-tcp --example
latency_probe`, honouring CARGO_TARGET_DIR) and copies both binaries to the temporary directory, so a
concurrent rebuild cannot swap them in the middle of a run.
"""

import argparse
import datetime
import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOFILE = 1_048_576
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

# ----------------------------------------------------------------------------------------------------------
# small helpers


def log(msg):
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Failure(Exception):
    """One measurement failed; the message says why."""


def raise_nofile():
    """Raise the open-file limit as far as allowed (root may raise the hard limit too)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (NOFILE, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard) if os.geteuid() == 0 else hard))
            return
        except (ValueError, OSError):
            continue
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass


def child_setup():
    # Runs in each child before exec: its own process group (so it can be stopped as a whole) and the
    # highest open-file limit we can get.
    os.setpgrp()
    raise_nofile()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port):
    """Whether something listens on 127.0.0.1:port (read from /proc, so no connection is made)."""
    want_local = f"0100007F:{port:04X}"
    want_any = f"00000000:{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[3] == "0A" and parts[1] in (want_local, want_any):
                    return True
    except OSError:
        pass
    return False


def run(cmd, timeout, **kw):
    """Run a command to completion; returns CompletedProcess; raises Failure on timeout/not found."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=child_setup, **kw)
    except subprocess.TimeoutExpired as e:
        raise Failure(f"{shlex.join(cmd)} did not finish within {timeout:.0f} s") from e
    except OSError as e:
        raise Failure(f"cannot run {cmd[0]}: {e}") from e


def tail(text, n=3):
    lines = [l for l in (text or "").strip().splitlines() if l.strip()]
    return " | ".join(lines[-n:]) if lines else "(no output)"


def proc_tree(pid):
    """pid and all its descendants."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def rss_kib(pid):
    """Sum of VmRSS over the process and its descendants, KiB."""
    total = 0
    for p in proc_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


def cpu_seconds(pid):
    """utime+stime of the process and its descendants, seconds."""
    total = 0
    for p in proc_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            continue
    return total / CLK_TCK


# ----------------------------------------------------------------------------------------------------------
# processes


class Procs:
    """Every long-running process started, so that all are stopped and waited for at the end."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.live = []
        self.seq = 0

    def start(self, name, cmd, env=None):
        self.seq += 1
        logpath = os.path.join(self.tmp, f"{self.seq:04d}-{name}.log")
        logf = open(logpath, "w")
        try:
            p = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                preexec_fn=child_setup,
                env=env,
            )
        except OSError as e:
            logf.close()
            raise Failure(f"cannot start {name} ({cmd[0]}): {e}") from e
        p.name, p.logpath, p.logf = name, logpath, logf
        self.live.append(p)
        return p

    def output(self, p):
        try:
            p.logf.flush()
            with open(p.logpath) as f:
                return f.read()
        except OSError:
            return ""

    def stop(self, p, grace=3.0):
        if p not in self.live:
            return
        self.live.remove(p)
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                p.terminate()
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    p.kill()
                p.wait()
        else:
            # Already exited: the group may still hold children (haproxy -W, nginx workers).
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        p.logf.close()

    def stop_all(self):
        for p in list(reversed(self.live)):
            try:
                self.stop(p, grace=2.0)
            except Exception as e:  # keep stopping the others
                log(f"while stopping {p.name}: {e}")


def wait_listening(procs, p, port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise Failure(f"{p.name} exited with status {p.returncode} before listening: {tail(procs.output(p))}")
        if listening(port):
            return
        time.sleep(0.02)
    raise Failure(f"{p.name} not listening on 127.0.0.1:{port} after {timeout:.0f} s: {tail(procs.output(p))}")


# ----------------------------------------------------------------------------------------------------------
# set-up: tools, build, backends


def ensure_tools():
    # tool -> Debian package
    needed = {"haproxy": "haproxy", "nginx": "nginx", "wrk": "wrk", "iperf3": "iperf3",
              "redis-server": "redis-server", "redis-benchmark": "redis-tools", "strace": "strace"}
    missing = sorted({pkg for tool, pkg in needed.items() if not tool_path(tool)})
    if missing:
        if os.geteuid() != 0:
            sys.exit(f"compare.py: missing tools {', '.join(missing)}; install them (apt-get install -y {' '.join(missing)})")
        log(f"installing {' '.join(missing)} from Debian")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y"] + missing):
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"compare.py: {shlex.join(cmd)} failed ({r.returncode}): {tail(r.stderr)}")
    still = [t for t in needed if not tool_path(t)]
    if still:
        sys.exit(f"compare.py: still missing after install: {', '.join(still)}")


def tool_path(tool):
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin")


def sockperf_note():
    if tool_path("sockperf"):
        return "sockperf installed but not used: latency comes from examples/latency_probe.rs for every target"
    try:
        r = subprocess.run(["apt-cache", "policy", "sockperf"], capture_output=True, text=True, timeout=30)
        m = re.search(r"Candidate:\s*(\S+)", r.stdout)
        if m and m.group(1) != "(none)":
            return f"sockperf {m.group(1)} available from Debian, not used: latency comes from examples/latency_probe.rs"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "sockperf not available; latency comes from examples/latency_probe.rs"


def build(tmp):
    target_dir = os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target")
    if not os.path.isabs(target_dir):
        target_dir = os.path.join(REPO, target_dir)
    cmd = ["cargo", "build", "--release", "--bin", "ulb-tcp", "--example", "latency_probe"]
    log(f"building: {shlex.join(cmd)} (CARGO_TARGET_DIR={target_dir})")
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, CARGO_TARGET_DIR=target_dir))
    if r.returncode != 0:
        sys.exit(f"compare.py: the build failed ({r.returncode}):\n{r.stderr[-4000:]}")
    bins = {}
    for name, rel in (("ulb", "release/ulb-tcp"), ("probe", "release/examples/latency_probe")):
        src = os.path.join(target_dir, rel)
        dst = os.path.join(tmp, os.path.basename(rel))
        shutil.copy2(src, dst)
        bins[name] = dst
    return bins


def start_nginx(procs, tmp):
    root = os.path.join(tmp, "nginx")
    www = os.path.join(root, "www")
    os.makedirs(www)
    with open(os.path.join(www, "1k.bin"), "wb") as f:
        f.write(b"x" * 1023 + b"\n")
    port = free_port()
    conf = os.path.join(root, "nginx.conf")
    tmpdirs = "\n".join(f"    {d}_temp_path {root}/{d};" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    with open(conf, "w") as f:
        f.write(
            f"""daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 200000;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{
    worker_connections 100000;
    multi_accept on;
}}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    default_type application/octet-stream;
{tmpdirs}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {www};
        location = / {{ return 200 "ok\\n"; }}
        location = /1k.bin {{ }}
    }}
}}
"""
        )
    p = procs.start("nginx", [tool_path("nginx"), "-p", root, "-c", conf, "-e", os.path.join(root, "error.log")])
    wait_listening(procs, p, port)
    return p, port


def start_iperf3(procs):
    port = free_port()
    p = procs.start("iperf3-server", [tool_path("iperf3"), "-s", "-B", "127.0.0.1", "-p", str(port)])
    wait_listening(procs, p, port)
    return p, port


def start_redis(procs, tmp):
    root = os.path.join(tmp, "redis")
    os.makedirs(root, exist_ok=True)
    port = free_port()
    # No persistence, no protected mode (loopback only anyway), plenty of clients.
    cmd = [tool_path("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--protected-mode", "no", "--daemonize", "no", "--dir", root, "--maxclients", "10000", "--loglevel", "warning"]
    p = procs.start("redis-server", cmd)
    wait_listening(procs, p, port)
    return p, port


def start_echo(procs, bins):
    port = free_port()
    p = procs.start("echo-server", [bins["probe"], "echo-server", "--listen", f"127.0.0.1:{port}"])
    wait_listening(procs, p, port)
    return p, port


# ----------------------------------------------------------------------------------------------------------
# targets


class Target:
    """How to put something between the client and a backend; `direct` puts nothing."""

    def __init__(self, name, kind, group, args=None, haproxy=None, env=None):
        self.name, self.kind, self.group, self.args, self.haproxy = name, kind, group, args or [], haproxy
        self.env = env or {}

    def start(self, env, backend_port):
        """Returns (port clients use, process or None)."""
        if self.kind == "direct":
            return backend_port, None
        port = free_port()
        if self.kind == "ulb":
            cmd = [env.bins["ulb"], "--listen", f"127.0.0.1:{port}", "--backends", f"127.0.0.1:{backend_port}"]
            cmd += ["--drain-timeout", "1s"] + self.args
            p = env.procs.start(self.name, cmd, env=dict(os.environ, RUST_LOG="warn", **self.env))
        elif self.kind == "program":
            listen, backend = f"127.0.0.1:{port}", f"127.0.0.1:{backend_port}"
            cmd = [a.replace("{listen}", listen).replace("{backend}", backend) for a in self.args]
            p = env.procs.start(self.name, cmd, env=dict(os.environ, RUST_LOG="warn", **self.env))
        else:
            threads, splice = self.haproxy
            cfg = os.path.join(env.tmp, f"haproxy-{port}.cfg")
            with open(cfg, "w") as f:
                f.write(haproxy_cfg(port, backend_port, threads, splice))
            p = env.procs.start(self.name, [tool_path("haproxy"), "-db", "-f", cfg])
        try:
            wait_listening(env.procs, p, port)
        except Failure:
            env.procs.stop(p)
            raise
        return port, p


def fd_limit():
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def haproxy_maxconn():
    """(maxconn, maxpipes or None): 200000 as asked, unless the open-file limit cannot hold it (HAProxy
    refuses to start when it cannot raise its limit to 2 * maxconn + 2 * maxpipes + a few)."""
    lim = fd_limit()
    if lim >= 2 * 200_000 + 2 * 50_000 + 100:
        return 200_000, None
    return (lim - 2 * 500 - 100) // 2, 500


def haproxy_cfg(port, backend_port, threads, splice):
    splice_lines = "    option splice-request\n    option splice-response\n" if splice else ""
    maxconn, maxpipes = haproxy_maxconn()
    pipes = f"    maxpipes {maxpipes}\n" if maxpipes else ""
    return f"""global
    maxconn {maxconn}
{pipes}    nbthread {threads}

defaults
    mode tcp
    no log
    maxconn {maxconn}
    timeout client 5m
    timeout server 5m
    timeout connect 5s
{splice_lines}
frontend fe
    bind 127.0.0.1:{port}
    default_backend be

backend be
    server s1 127.0.0.1:{backend_port}
"""


def make_targets(bins, quick, variants=(), skip=(), programs=()):
    targets = [Target("direct", "direct", "direct"), Target("ulb-tcp", "ulb", "ulb-tcp")]
    r = subprocess.run([bins["ulb"], "--help"], capture_output=True, text=True)
    # Extra ulb-tcp rows for the other data paths and runtimes the binary offers.
    plain = []
    for mode, label in (("pooled", "ulb-tcp pooled"), ("splice", "ulb-tcp splice"), ("plain", "ulb-tcp plain copy")):
        if "--copy-mode" in r.stdout and mode in r.stdout:
            targets.append(Target(label, "ulb", label, args=["--copy-mode", mode]))
            plain.append(label)
    m = re.search(r"--runtime\b.*?\[default: ([\w-]+)\]", r.stdout, re.S)
    for mode in ("per-core", "work-stealing") if m else ():
        if mode != m.group(1):
            label = f"ulb-tcp {mode}"
            targets.append(Target(label, "ulb", label, args=["--runtime", mode]))
            plain.append(label)
    # --variant LABEL=FLAGS: more ulb-tcp rows, for trying flags side by side.
    for v in variants:
        label, _, flags = v.partition("=")
        label = f"ulb-tcp {label.strip()}"
        targets.append(Target(label, "ulb", label, args=shlex.split(flags)))
        plain.append(label)
    # --program LABEL=COMMAND: any other forwarder (a prototype data path), side by side.
    for v in programs:
        label, _, command = v.partition("=")
        label = label.strip()
        targets.append(Target(label, "program", label, args=shlex.split(command)))
        plain.append(label)
    variants = [(1, False), (2, True)] if quick else [(1, False), (1, True), (2, False), (2, True)]
    for threads, splice in variants:
        name = f"HAProxy {threads}t" + (" splice" if splice else "")
        targets.append(Target(name, "haproxy", "HAProxy", haproxy=(threads, splice)))
    kept = [t for t in targets if t.name in ("direct", "ulb-tcp") or not any(t.name == n for n in skip)]
    return kept, [p for p in plain if any(t.name == p for t in kept)]


# ----------------------------------------------------------------------------------------------------------
# scenarios: each returns {metric: value}; raises Failure


class Env:
    def __init__(self, tmp, procs, bins, args):
        self.tmp, self.procs, self.bins, self.args = tmp, procs, bins, args
        self.backends = {}

    def backend(self, kind):
        """Port of a running backend of this kind, restarting it if it died."""
        p, port = self.backends.get(kind, (None, None))
        if p is not None and p.poll() is None:
            return port
        if p is not None:
            log(f"{kind} backend had exited ({p.returncode}): {tail(self.procs.output(p))}; restarting it")
            self.procs.stop(p)
        starter = {"nginx": lambda: start_nginx(self.procs, self.tmp), "iperf3": lambda: start_iperf3(self.procs),
                   "echo": lambda: start_echo(self.procs, self.bins),
                   "redis": lambda: start_redis(self.procs, self.tmp)}[kind]
        p, port = starter()
        self.backends[kind] = (p, port)
        return port

    def restart_backend(self, kind):
        p, _ = self.backends.pop(kind, (None, None))
        if p is not None:
            self.procs.stop(p)


def s1_iperf(env, target, streams, reverse, want_cpu):
    bport = env.backend("iperf3")
    port, bal = target.start(env, bport)
    try:
        cmd = [tool_path("iperf3"), "-c", "127.0.0.1", "-p", str(port), "-t", str(env.args.seconds), "-J"]
        if streams > 1:
            cmd += ["-P", str(streams)]
        if reverse:
            cmd.append("-R")
        cpu0 = cpu_seconds(bal.pid) if bal else None
        r = run(cmd, timeout=env.args.seconds + 30)
        cpu1 = cpu_seconds(bal.pid) if bal else None
        try:
            data = json.loads(r.stdout)
        except ValueError:
            data = {}
        if r.returncode != 0 or "error" in data:
            env.restart_backend("iperf3")  # a failed test can leave the server waiting
            raise Failure(f"iperf3 exited {r.returncode}: {data.get('error') or tail(r.stderr or r.stdout)}")
        recv = data["end"]["sum_received"]
        out = {"gbps": recv["bits_per_second"] / 1e9}
        if want_cpu and bal is not None:
            gb = recv["bytes"] / 1e9
            out["cpu_per_gb"] = (cpu1 - cpu0) / gb if gb > 0 else None
        if bal is not None and bal.poll() is not None:
            raise Failure(f"{target.name} exited ({bal.returncode}) during the run: {tail(env.procs.output(bal))}")
        return out
    finally:
        if bal is not None:
            env.procs.stop(bal)


WRK_RPS = re.compile(r"Requests/sec:\s*([\d.]+)")
WRK_REQS = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b")
WRK_ERR = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def wrk_cmd(env, port, threads, close, seconds=None):
    cmd = [tool_path("wrk"), f"-t{threads}", "-c50", f"-d{seconds or env.args.seconds}s"]
    if close:
        cmd += ["-H", "Connection: close"]
    return cmd + [f"http://127.0.0.1:{port}/"]


def parse_wrk(r):
    """(requests/s, requests completed, notes) from a finished wrk; raises Failure."""
    m = WRK_RPS.search(r.stdout)
    n = WRK_REQS.search(r.stdout)
    if r.returncode != 0 or not m or not n:
        raise Failure(f"wrk exited {r.returncode}: {tail(r.stderr or r.stdout)}")
    rps, reqs = float(m.group(1)), int(n.group(1))
    notes = []
    e = WRK_ERR.search(r.stdout)
    if e:
        c, rd, w, t = map(int, e.groups())
        # With "Connection: close" wrk counts nothing as an error for a clean close; anything here is real.
        if c + rd + w + t:
            notes.append(f"socket errors connect {c} read {rd} write {w} timeout {t}")
    x = WRK_NON2XX.search(r.stdout)
    if x and int(x.group(1)):
        notes.append(f"{x.group(1)} non-2xx responses")
    if rps <= 0 or reqs <= 0:
        raise Failure(f"wrk measured 0 requests/s: {tail(r.stdout)}")
    return rps, reqs, notes


def s_wrk(env, target, close, threads):
    """requests/s of `wrk -tN -c50`, and the balancer's CPU µs per request (all its threads, utime+stime
    read from /proc around the run; with Connection: close one request is one connection)."""
    bport = env.backend("nginx")
    port, bal = target.start(env, bport)
    try:
        cpu0 = cpu_seconds(bal.pid) if bal else None
        m0 = machine_snapshot()
        r = run(wrk_cmd(env, port, threads, close), timeout=env.args.seconds + 30)
        m1 = machine_snapshot()
        cpu1 = cpu_seconds(bal.pid) if bal else None
        rps, reqs, notes = parse_wrk(r)
        if bal is not None and bal.poll() is not None:
            raise Failure(f"{target.name} exited ({bal.returncode}) during the run: {tail(env.procs.output(bal))}")
        out = {"rps": rps, "_notes": notes, "machine_us": machine_cpu_us(m0, m1, reqs)}
        if bal is not None:
            out["cpu_us"] = (cpu1 - cpu0) * 1e6 / reqs
        return out
    finally:
        if bal is not None:
            env.procs.stop(bal)


def redis_requests(args, pipeline):
    """Requests per test (-n) for redis-benchmark: sized so that one test lasts about --seconds through a
    balancer on a small machine (loopback, 2 cores: ~400k/s with -P 16, ~40k/s with -P 1 through a balancer)."""
    if pipeline > 1:
        return args.redis_n16 or 400_000 * args.seconds
    return args.redis_n1 or 40_000 * args.seconds


def s_redis(env, target, pipeline):
    """redis-benchmark -t get,set -c 50 -P N -n REQUESTS against a redis-server behind the target: GET and SET
    requests/s, and the balancer's CPU µs per request over both tests. Bounded in count (-n) and time (timeout)."""
    bport = env.backend("redis")
    port, bal = target.start(env, bport)
    try:
        n = redis_requests(env.args, pipeline)
        cmd = [tool_path("redis-benchmark"), "-h", "127.0.0.1", "-p", str(port), "-t", "get,set", "-c", "50",
               "-P", str(pipeline), "-n", str(n), "--csv"]
        # Time bound: a generous multiple of the planned duration (2 tests of about --seconds each).
        timeout = max(30, 8 * env.args.seconds)
        cpu0 = cpu_seconds(bal.pid) if bal else None
        m0 = machine_snapshot()
        r = run(cmd, timeout=timeout)
        m1 = machine_snapshot()
        cpu1 = cpu_seconds(bal.pid) if bal else None
        if r.returncode != 0:
            raise Failure(f"redis-benchmark exited {r.returncode}: {tail(r.stderr or r.stdout)}")
        got = {}
        for line in r.stdout.splitlines():
            cells = [c.strip('"') for c in line.strip().split(",")]
            if len(cells) >= 2 and cells[0] in ("GET", "SET"):
                try:
                    got[cells[0]] = float(cells[1])
                except ValueError:
                    pass
        if set(got) != {"GET", "SET"} or min(got.values()) <= 0:
            raise Failure(f"redis-benchmark printed no GET and SET rates: {tail(r.stdout + r.stderr)}")
        if bal is not None and bal.poll() is not None:
            raise Failure(f"{target.name} exited ({bal.returncode}) during the run: {tail(env.procs.output(bal))}")
        out = {"get": got["GET"], "set": got["SET"], "_notes": [], "machine_us": machine_cpu_us(m0, m1, 2 * n)}
        if bal is not None:
            out["cpu_us"] = (cpu1 - cpu0) * 1e6 / (2 * n)
        return out
    finally:
        if bal is not None:
            env.procs.stop(bal)


# System calls reported one by one (per connection); every other one counts in the total and in the details.
SYSCALLS = ["accept4", "connect", "socket", "close", "shutdown", "epoll_ctl", "epoll_wait", "getsockopt",
            "setsockopt", "sendto", "recvfrom", "read", "write", "splice"]
STRACE_CALL = re.compile(r"^(\d+)\s+([a-z_0-9]+)\(")
STRACE_RESUMED = re.compile(r"^(\d+)\s+<\.\.\. ([a-z_0-9]+) resumed>")
STRACE_RESULT = re.compile(r"= (-?\d+|\?|0x[0-9a-f]+)(?: (E[A-Z0-9]+))?(?: \(.*\))?\s*$")


def parse_strace(path):
    """({syscall: calls}, {(syscall, errno): failed calls}) from `strace -f -o path` output."""
    calls, errors = {}, {}
    with open(path, errors="replace") as f:
        for line in f:
            m = STRACE_RESUMED.match(line)
            if m:
                name = m.group(2)  # counted when it started (the "unfinished" line)
            else:
                m = STRACE_CALL.match(line)
                if not m:
                    continue  # signals, exits, attach/detach messages
                name = m.group(2)
                calls[name] = calls.get(name, 0) + 1
                if line.rstrip().endswith("<unfinished ...>"):
                    continue
            res = STRACE_RESULT.search(line)
            if res and res.group(2):
                errors[(name, res.group(2))] = errors.get((name, res.group(2)), 0) + 1
    return calls, errors


def s_syscalls(env, target):
    """System calls of the balancer (all threads, strace -f -p) per connection during a short
    `wrk -t2 -c50 -H "Connection: close"` run against nginx. Under strace every call stops the balancer twice,
    so it runs far slower than untraced: more work waits per wake-up, which lowers the counts that depend on
    timing (epoll_wait, failed accept4/reads) below what an untraced run makes. Counts per connection of the
    rest (accept4, connect, close, ...) do not depend on speed."""
    bport = env.backend("nginx")
    port, bal = target.start(env, bport)
    tracer = None
    try:
        trace = os.path.join(env.tmp, f"strace-{port}.txt")
        tracer = env.procs.start("strace", [tool_path("strace"), "-f", "-s", "0", "-o", trace, "-p", str(bal.pid)])
        deadline = time.monotonic() + 10
        while "attached" not in env.procs.output(tracer):
            if tracer.poll() is not None or time.monotonic() > deadline:
                raise Failure(f"strace did not attach to {target.name}: {tail(env.procs.output(tracer))}")
            time.sleep(0.05)
        time.sleep(0.2)
        r = run(wrk_cmd(env, port, 2, True, seconds=env.args.syscall_seconds), timeout=env.args.syscall_seconds + 30)
        # Let the balancer finish the connections wrk left open when it stopped (their closes and shutdowns),
        # so that every connection accepted under the trace is traced to its end.
        time.sleep(1.0)
        env.procs.stop(tracer, grace=15.0)  # SIGTERM: strace detaches from every thread and flushes its output
        tracer = None
        _, reqs, notes = parse_wrk(r)
        calls, errors = parse_strace(trace)
        if bal.poll() is not None:
            raise Failure(f"{target.name} exited ({bal.returncode}) during the run: {tail(env.procs.output(bal))}")
        if not calls:
            raise Failure(f"strace recorded no system call of {target.name}")
        # Per connection = per connection the balancer accepted under the trace (successful accept4/accept):
        # wrk's count leaves out the ~50 it had in flight when it stopped, which the balancer handled all the same.
        accepted = sum(calls.get(k, 0) for k in ("accept4", "accept")) - sum(
            v for (k, _), v in errors.items() if k in ("accept4", "accept"))
        conns = accepted if accepted > 0 else reqs
        per = {f"sc_{k}": calls.get(k, 0) / conns for k in SYSCALLS}
        per["sc_total"] = sum(calls.values()) / conns
        per["sc_accept4_eagain"] = errors.get(("accept4", "EAGAIN"), 0) / conns
        notes.append(f"strace: {accepted:,} connections accepted" + ("" if accepted > 0 else " (none seen: divided by wrk's count)")
                     + f", {reqs:,} requests completed by wrk, {sum(calls.values()):,} system calls")
        per["_notes"] = notes
        per["_detail"] = {"conns": conns, "requests": reqs, "accepted": accepted, "calls": calls, "errors": errors}
        return per
    finally:
        if tracer is not None:
            env.procs.stop(tracer, grace=15.0)
        if bal is not None:
            env.procs.stop(bal)


def s4_latency(env, target):
    bport = env.backend("echo")
    port, bal = target.start(env, bport)
    try:
        a = env.args
        cmd = [env.bins["probe"], "load", "--target", f"127.0.0.1:{port}", "--rate", str(a.latency_rate),
               "--connections", str(a.latency_connections), "--seconds", str(a.seconds), "--size", "64"]
        r = run(cmd, timeout=a.seconds + 30)
        if r.returncode != 0:
            raise Failure(f"latency_probe load exited {r.returncode}: {tail(r.stderr)}")
        try:
            data = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise Failure(f"latency_probe printed no JSON: {tail(r.stdout)}")
        notes = []
        if data.get("errors"):
            notes.append(f"{data['errors']} probe errors: {tail(r.stderr, 1)}")
        expected = a.latency_rate * a.seconds
        if data["count"] < 0.9 * expected:
            notes.append(f"only {data['count']} of {expected:.0f} messages")
        return {"p50": data["p50_us"], "p99": data["p99_us"], "p999": data["p999_us"], "_notes": notes}
    finally:
        if bal is not None:
            env.procs.stop(bal)


def s5_memory(env, target):
    if target.kind == "direct":
        return {}
    bport = env.backend("echo")
    port, bal = target.start(env, bport)
    holder = None
    try:
        n = env.args.hold
        time.sleep(0.3)
        before = rss_kib(bal.pid)
        holder = env.procs.start("hold", [env.bins["probe"], "hold", "--target", f"127.0.0.1:{port}", "--connections", str(n)])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            out = env.procs.output(holder)
            if "ready" in out:
                break
            if holder.poll() is not None:
                raise Failure(f"latency_probe hold exited {holder.returncode}: {tail(out)}")
            time.sleep(0.1)
        else:
            raise Failure(f"latency_probe hold not ready after 120 s: {tail(env.procs.output(holder))}")
        time.sleep(0.5)
        after = rss_kib(bal.pid)
        if bal.poll() is not None:
            raise Failure(f"{target.name} exited ({bal.returncode}) while holding: {tail(env.procs.output(bal))}")
        return {"kib_per_conn": (after - before) / n, "rss_before_mib": before / 1024, "rss_after_mib": after / 1024}
    finally:
        if holder is not None:
            env.procs.stop(holder)
        if bal is not None:
            env.procs.stop(bal)


# Columns: (key, header, higher is better, table). Tables group the columns in the report.
TABLES = [
    ("rates", "S1–S3: throughput and request rates"),
    ("redis", "S7: redis-benchmark requests/s (GET and SET each)"),
    ("lat", "S4–S6: latency, memory per connection, CPU per GB"),
    ("cpu", "Balancer CPU per connection and per request (µs)"),
    ("mcpu", "Machine CPU per connection and per request (µs): client, backend, balancer, kernel threads and softirq; other processes left out"),
    ("sc", "S8: balancer system calls per connection (strace)"),
]
COLUMNS = [
    ("s1_1f", "S1 1 stream Gbit/s", True, "rates"),
    ("s1_1r", "S1 1 stream -R Gbit/s", True, "rates"),
    ("s1_4f", "S1 4 streams Gbit/s", True, "rates"),
    ("s1_4r", "S1 4 streams -R Gbit/s", True, "rates"),
    ("s2_t1", "S2 -t1 conn/s (close)", True, "rates"),
    ("s2_t2", "S2 -t2 conn/s (close)", True, "rates"),
    ("s3_t1", "S3 -t1 req/s (keep-alive)", True, "rates"),
    ("s3_t2", "S3 -t2 req/s (keep-alive)", True, "rates"),
    ("r16_get", "-P 16 GET/s", True, "redis"),
    ("r16_set", "-P 16 SET/s", True, "redis"),
    ("r1_get", "-P 1 GET/s", True, "redis"),
    ("r1_set", "-P 1 SET/s", True, "redis"),
    ("s4_p50", "S4 p50 µs", False, "lat"),
    ("s4_p99", "S4 p99 µs", False, "lat"),
    ("s4_p999", "S4 p99.9 µs", False, "lat"),
    ("s5", "S5 KiB/conn", False, "lat"),
    ("s6", "S6 CPU s/GB", False, "lat"),
    ("cpu_conn_t1", "per conn, S2 -t1", False, "cpu"),
    ("cpu_conn_t2", "per conn, S2 -t2", False, "cpu"),
    ("cpu_req_t1", "per req, S3 -t1", False, "cpu"),
    ("cpu_req_t2", "per req, S3 -t2", False, "cpu"),
    ("cpu_r16", "per req, redis -P 16", False, "cpu"),
    ("cpu_r1", "per req, redis -P 1", False, "cpu"),
    ("mcpu_conn_t1", "per conn, S2 -t1", False, "mcpu"),
    ("mcpu_conn_t2", "per conn, S2 -t2", False, "mcpu"),
    ("mcpu_req_t1", "per req, S3 -t1", False, "mcpu"),
    ("mcpu_req_t2", "per req, S3 -t2", False, "mcpu"),
    ("mcpu_r16", "per req, redis -P 16", False, "mcpu"),
    ("mcpu_r1", "per req, redis -P 1", False, "mcpu"),
    ("sc_total", "total", False, "sc"),
] + [(f"sc_{k}", k, False, "sc") for k in SYSCALLS[:1]] + [("sc_accept4_eagain", "accept4 EAGAIN", False, "sc")] + [
    (f"sc_{k}", k, False, "sc") for k in SYSCALLS[1:]
]
COLUMN = {k: (h, higher, table) for k, h, higher, table in COLUMNS}
ADDED = ("s4_p50", "s4_p99", "s4_p999")  # shown with the added latency (target minus direct, same round)


class Scenario:
    """name (for --only), fn(target) -> {column key: value}, the columns it fills, those it fills only behind a
    balancer (n/a for direct), and which targets it runs for."""

    def __init__(self, name, fn, keys, balancer_keys=(), applies=None):
        self.name, self.fn, self.keys, self.balancer_keys = name, fn, keys, set(balancer_keys)
        self.applies = applies or (lambda t: True)

    def expected(self, t):
        return [k for k in self.keys if not (t.kind == "direct" and k in self.balancer_keys)]


def scenarios(env):
    a = env.args

    def iperf(streams, rev, key):
        def f(t):
            r = s1_iperf(env, t, streams, rev, want_cpu=(streams == 1 and not rev))
            out = {key: r["gbps"]}
            if "cpu_per_gb" in r:
                out["s6"] = r["cpu_per_gb"]
            return out

        return f

    def wrk(close, threads, key, cpu_key):
        def f(t):
            r = s_wrk(env, t, close, threads)
            return {key: r["rps"], cpu_key: r.get("cpu_us"), f"m{cpu_key}": r["machine_us"], "_notes": r["_notes"]}

        return f

    def redis(pipeline):
        pre = "r16" if pipeline > 1 else "r1"

        def f(t):
            r = s_redis(env, t, pipeline)
            return {f"{pre}_get": r["get"], f"{pre}_set": r["set"], f"cpu_{pre}": r.get("cpu_us"),
                    f"mcpu_{pre}": r["machine_us"], "_notes": r["_notes"]}

        return f

    def lat(t):
        r = s4_latency(env, t)
        return {"s4_p50": r["p50"], "s4_p99": r["p99"], "s4_p999": r["p999"], "_notes": r["_notes"]}

    def mem(t):
        r = s5_memory(env, t)
        return {"s5": r["kib_per_conn"]}

    sc_targets = [n.strip() for n in a.syscall_targets.split(",") if n.strip()]
    sc_keys = [k for k, _, _, table in COLUMNS if table == "sc"]
    return [
        Scenario("S1 iperf3 1 stream", iperf(1, False, "s1_1f"), ["s1_1f", "s6"], ["s6"]),
        Scenario("S1 iperf3 1 stream -R", iperf(1, True, "s1_1r"), ["s1_1r"]),
        Scenario("S1 iperf3 4 streams", iperf(4, False, "s1_4f"), ["s1_4f"]),
        Scenario("S1 iperf3 4 streams -R", iperf(4, True, "s1_4r"), ["s1_4r"]),
        Scenario("S2 wrk -t1 Connection: close", wrk(True, 1, "s2_t1", "cpu_conn_t1"), ["s2_t1", "cpu_conn_t1", "mcpu_conn_t1"], ["cpu_conn_t1"]),
        Scenario("S2 wrk -t2 Connection: close", wrk(True, 2, "s2_t2", "cpu_conn_t2"), ["s2_t2", "cpu_conn_t2", "mcpu_conn_t2"], ["cpu_conn_t2"]),
        Scenario("S3 wrk -t1 keep-alive", wrk(False, 1, "s3_t1", "cpu_req_t1"), ["s3_t1", "cpu_req_t1", "mcpu_req_t1"], ["cpu_req_t1"]),
        Scenario("S3 wrk -t2 keep-alive", wrk(False, 2, "s3_t2", "cpu_req_t2"), ["s3_t2", "cpu_req_t2", "mcpu_req_t2"], ["cpu_req_t2"]),
        Scenario("S7 redis-benchmark -P 16", redis(16), ["r16_get", "r16_set", "cpu_r16", "mcpu_r16"], ["cpu_r16"]),
        Scenario("S7 redis-benchmark -P 1", redis(1), ["r1_get", "r1_set", "cpu_r1", "mcpu_r1"], ["cpu_r1"]),
        Scenario("S4 latency_probe load", lat, ["s4_p50", "s4_p99", "s4_p999"]),
        Scenario("S5 latency_probe hold", mem, ["s5"], applies=lambda t: t.kind != "direct"),
        Scenario("S8 syscalls strace wrk Connection: close", lambda t: s_syscalls(env, t), sc_keys,
                 applies=lambda t: t.name in sc_targets),
    ]


def select_scenarios(scens, only):
    """--only/--scenarios: comma-separated; a scenario is kept when a word is a prefix of its name or, from 3
    letters on, appears in it (case-insensitive): 'S1,S3', 'redis', '-t1', 'syscalls'."""
    words = [w.strip().lower() for w in only.split(",") if w.strip()]
    keep = [s for s in scens if any(s.name.lower().startswith(w) or (len(w) >= 3 and w in s.name.lower()) for w in words)]
    return keep


# ----------------------------------------------------------------------------------------------------------
# foreign load: CPU used during a measurement by processes that are not this script or its descendants


def cpu_snapshot():
    """(monotonic time, machine busy CPU seconds, this script's and its descendants' CPU seconds).

    Machine busy = user + nice + system of /proc/stat's "cpu" line (irq, softirq and steal left out: with IRQ
    time accounting the softirq work of loopback traffic is not charged to any process, so it could not be told
    ours or foreign). Ours = os.times() of this process (itself and every child it has reaped) plus
    utime+stime+cutime+cstime of each live descendant, so a child reaped between two snapshots moves from one
    term to the other without a jump."""
    now = time.monotonic()
    with open("/proc/stat") as f:
        fields = f.readline().split()
    busy = sum(int(x) for x in fields[1:4]) / CLK_TCK
    t = os.times()
    ours = t.user + t.system + t.children_user + t.children_system
    me = os.getpid()
    for p in proc_tree(me):
        if p == me:
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                stat = f.read()
            v = stat[stat.rindex(")") + 2 :].split()
            ours += (int(v[11]) + int(v[12]) + int(v[13]) + int(v[14])) / CLK_TCK
        except (OSError, ValueError, IndexError):
            continue
    return now, busy, ours


PF_KTHREAD = 0x00200000


def machine_snapshot():
    """(machine busy CPU seconds, {pid: CPU seconds} of the user-space processes that are not this script or its
    descendants) for the machine-wide CPU per request: busy = user + nice + system + irq + softirq of
    /proc/stat, so the softirq work of loopback TCP and the kernel threads a data path wakes (kworkers of a
    sockmap splice) count, which the balancer's own /proc figures leave out."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    busy = sum(int(x) for x in fields[1:4] + fields[6:8]) / CLK_TCK
    ours = set(proc_tree(os.getpid()))
    foreign = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in ours:
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            v = stat[stat.rindex(")") + 2 :].split()
            if int(v[6]) & PF_KTHREAD:
                continue
            foreign[int(entry)] = (int(v[11]) + int(v[12])) / CLK_TCK
        except (OSError, ValueError, IndexError):
            continue
    return busy, foreign


def machine_cpu_us(before, after, work):
    """Machine-wide CPU µs per unit of work between two snapshots, less foreign user-space processes (those alive
    at both; kernel threads are counted as ours: loopback traffic is what wakes them)."""
    foreign = sum(max(0.0, c - before[1][p]) for p, c in after[1].items() if p in before[1])
    return max(0.0, (after[0] - before[0]) - foreign) * 1e6 / work


def foreign_cores(before, after):
    dt = after[0] - before[0]
    if dt <= 0:
        return 0.0
    return max(0.0, (after[1] - before[1]) - (after[2] - before[2])) / dt


# ----------------------------------------------------------------------------------------------------------
# report


def fmt(v, key):
    if v is None:
        return "n/a"
    if key.startswith("s1") or key in ("s5", "s6") or key.startswith(("cpu", "mcpu")) or key.startswith("sc_"):
        return f"{v:.2f}"
    if key.startswith(("s2", "s3", "r1", "r16")):
        return f"{v:,.0f}"
    return f"{v:.1f}"


def added_fmt(v, key):
    return ("+" if v >= 0 else "−") + fmt(abs(v), key)


def ratio_fmt(v):
    return f"{v:.2f}×"


class Results:
    def __init__(self, targets):
        self.targets = targets
        self.values = {t.name: {k: {} for k in COLUMN} for t in targets}  # name -> key -> {round: value}
        self.failed = {t.name: {k: [] for k in COLUMN} for t in targets}  # name -> key -> [rounds]
        self.details = {t.name: {} for t in targets}  # name -> {round: strace detail}
        self.failures = []  # (round, scenario, target, reason)
        self.notes = []  # (round, scenario, target, note)
        self.foreign = []  # (round, scenario, target, cores of the measurement kept, redos)

    def vals(self, name, key):
        return list(self.values.get(name, {}).get(key, {}).values())

    def median(self, name, key):
        v = self.vals(name, key)
        return statistics.median(v) if v else None

    def added(self, name, key):
        """Target minus direct in the same round."""
        mine, base = self.values[name][key], self.values.get("direct", {}).get(key, {})
        return [v - base[r] for r, v in mine.items() if r in base]

    def cell(self, name, key, spread=False):
        vals = self.vals(name, key)
        if not vals:
            return "fail" if self.failed[name][key] else "n/a"
        s = fmt(statistics.median(vals), key)
        if key in ADDED and name != "direct" and self.added(name, key):
            s += f" ({added_fmt(statistics.median(self.added(name, key)), key)})"
        if spread and len(vals) > 1:
            s += f" [{fmt(min(vals), key)}–{fmt(max(vals), key)}]"
        if self.failed[name][key]:
            s += f" ({len(self.failed[name][key])} fail)"
        return s

    def best(self, group, key, higher):
        cands = [(self.median(t.name, key), t.name) for t in self.targets if t.group == group]
        cands = [c for c in cands if c[0] is not None]
        if not cands:
            return None, None
        return (max if higher else min)(cands)

    def paired(self, name, key):
        """(HAProxy variant with the best median for this figure, [this target ÷ it, for each round both have])."""
        _, ref = self.best("HAProxy", key, COLUMN[key][1])
        if ref is None:
            return None, []
        mine, theirs = self.values[name][key], self.values[ref][key]
        return ref, [v / theirs[r] for r, v in sorted(mine.items()) if theirs.get(r)]

    def has_data(self, key):
        return any(self.values[t.name][key] or self.failed[t.name][key] for t in self.targets)


def report(res, targets, plain, header, args, elapsed):
    out = []
    out.append("# Benchmarks: ulb-tcp vs direct vs HAProxy\n")
    out.append("Generated by `benches/compare.py`; re-run it to refresh this file.\n")
    out.append("## Machine and run\n")
    for k, v in header:
        out.append(f"- **{k}:** {v}")
    out.append(f"- **duration of this run:** {elapsed / 60:.1f} min")
    out.append("")
    out.append("## What is measured\n")
    out.append(
        "All on loopback (127.0.0.1), client, balancer and backend on the same machine, so they compete for the\n"
        "same cores: these are relative figures for this machine, not capacity planning numbers. Each\n"
        "measurement starts its balancer fresh and stops it afterwards; rounds interleave every scenario and\n"
        "target (for round: for scenario: for target), and each cell is the median over rounds. The target order\n"
        "rotates: in round r (from 1) the targets start at position r − 1 of the list, so that no target always\n"
        "runs right after `direct` (that position was measured to lose about 8% of the connection rate).\n"
    )
    s = args.seconds
    out.append(f"- **S1** iperf3 `-t {s}` to an iperf3 server, 1 and 4 streams (`-P 4`), client→server and `-R`; Gbit/s received. iperf3's control connection goes through the balancer too.")
    out.append(f"- **S2** `wrk -t1 -c50 -d{s}s -H \"Connection: close\"` and the same with `-t2`, against nginx `return 200 \"ok\\n\"`: a new TCP connection (through the balancer: two) per request; requests/s.")
    out.append(f"- **S3** `wrk -t1 -c50 -d{s}s` and `-t2`, keep-alive against the same nginx; requests/s.")
    out.append(f"- **S4** `latency_probe load`: {args.latency_rate} messages/s of 64 bytes over {args.latency_connections} connections to an echo server, for {s} s after a 0.5 s warm-up, each echo timed (from the intended send time when the connection was still busy: no coordinated omission); µs. In brackets: added latency, the target minus direct in the same round (median over rounds).")
    out.append(f"- **S5** `latency_probe hold`: {args.hold:,} connections opened through a fresh balancer to the echo server, each verified with a 4-byte echo, then held idle; (balancer RSS after − before) / {args.hold:,}, KiB per connection. HAProxy: sum over its processes. Kernel socket memory is not in RSS and not counted.")
    out.append("- **S6** balancer utime+stime (`/proc/PID/stat`, all threads) during the S1 1-stream client→server run, divided by the GB (10^9 bytes) iperf3 received. Direct: n/a.")
    out.append(f"- **S7** `redis-benchmark -t get,set -c 50 -P 16 -n {redis_requests(args, 16):,}` and `-P 1 -n {redis_requests(args, 1):,}` (requests per test) against `redis-server` (no persistence) behind the target; requests/s of the GET and of the SET test, both reported (not their mean). Each run is bounded by its count and by a {max(30, 8 * s)} s timeout.")
    out.append(f"- **CPU per connection / request**: balancer utime+stime (`/proc/PID/stat`, all threads) read just before and after each S2, S3 and S7 run, divided by the requests completed (wrk's count; with `Connection: close` one request is one connection; redis: both tests' requests); µs. Direct: n/a. The kernel counts this time in clock ticks of {1000 / CLK_TCK:.0f} ms, so a short run gives a coarse figure (a 2 s run at one core: 1 tick in 200).")
    out.append("- **Machine CPU per connection / request**: the whole machine's busy time (`/proc/stat` user, nice, system, "
               "irq and softirq) during the same runs, less the CPU of user-space processes that are not this script's, "
               "divided by the same counts; µs. It holds the client's and backend's share (the `direct` row is that share "
               "alone), the balancer's, the softirq work of loopback TCP and any kernel thread the data path wakes "
               "(a sockmap splice's kworkers), none of which can be moved out of view by a different data path.")
    out.append(f"- **S8** the balancer's system calls, `strace -f -p PID` (every thread) during `wrk -t2 -c50 -d{args.syscall_seconds}s -H \"Connection: close\"` against nginx, divided by the connections the balancer accepted under the trace (successful accept4; the trace goes on 1 s after wrk stops, so that those wrk left open are traced to their close); for {args.syscall_targets}. `accept4 EAGAIN`: accept4 calls that failed with EAGAIN (strace prints each call's errno). Traced, the balancer runs far slower, so more work is waiting at each wake-up: the counts that depend on timing (epoll_wait, failed accept4 and reads) come out lower than untraced; those of accept4, connect, socket, close, shutdown, getsockopt do not.")
    gate = (f"on: a measurement during which other processes used more than {args.gate_foreign_cpu} cores was redone, at most {args.gate_redos} times"
            if args.gate_foreign_cpu is not None else "off (`--gate-foreign-cpu CORES` redoes a measurement during which other processes used more)")
    out.append(f"- **Foreign load**: CPU that processes other than this script and its children used during each measurement (`/proc/stat` user+nice+system minus ours); gating {gate}.")
    out.append("")
    out.append("Higher is better for S1–S3 and S7, lower for the others. **Paired ratios**: for each figure, HAProxy's best variant is the one with the best median over the run; in every round, the ulb-tcp row ÷ that variant's value in the same round; the median of these per-round ratios with their min–max. The unpaired ratios (median ÷ median) are there too.\n")

    present = {t.name for t in targets}
    main_names = [n for n in ["direct", "ulb-tcp"] + list(plain) if n in present]
    ulb_names = [n for n in main_names if n != "direct"]

    def tables(title, rows_fn, note=None):
        out.append(f"## {title}\n")
        if note:
            out.append(note + "\n")
        for tkey, ttitle in TABLES:
            keys = [k for k, _, _, table in COLUMNS if table == tkey and res.has_data(k)]
            if not keys:
                continue
            rows = [r for r in rows_fn(keys, tkey) if any(c not in ("n/a",) for c in r[1:])]
            if not rows:
                continue
            out.append(f"### {ttitle}\n")
            out.append("| target | " + " | ".join(COLUMN[k][0] for k in keys) + " |")
            out.append("|---|" + "---:|" * len(keys))
            for r in rows:
                out.append("| " + " | ".join(r) + " |")
            out.append("")

    def summary_rows(keys, tkey):
        if tkey == "sc":  # only the traced targets have these: show each of them, no "best" row
            return [[t.name] + [res.cell(t.name, k) for k in keys] for t in targets]
        rows = [[n] + [res.cell(n, k) for k in keys] for n in main_names]
        hap = []
        for k in keys:
            v, who = res.best("HAProxy", k, COLUMN[k][1])
            if v is None:
                anyfail = any(res.failed[t.name][k] for t in targets if t.group == "HAProxy")
                hap.append("fail" if anyfail else "n/a")
            else:
                c = fmt(v, k)
                if k in ADDED and res.added(who, k):
                    c += f" ({added_fmt(statistics.median(res.added(who, k)), k)})"
                hap.append(f"{c} ({who.replace('HAProxy ', '')})")
        return rows + [["HAProxy best"] + hap]

    tables("Summary (medians)", summary_rows,
           "HAProxy best: the best median among its variants for each column, the variant in brackets "
           "(`1t`/`2t` = `nbthread`, `splice` = `option splice-request` + `option splice-response`).")

    def ratio_rows(keys, tkey):
        rows = []
        for n in ulb_names:
            for ref_label, ref in (("direct", "direct"), ("HAProxy best", None)):
                cells = []
                for k in keys:
                    a = res.median(n, k)
                    b = res.median(ref, k) if ref else res.best("HAProxy", k, COLUMN[k][1])[0]
                    cells.append(ratio_fmt(a / b) if a is not None and b else "n/a")
                rows.append([f"{n} ÷ {ref_label}"] + cells)
        return rows

    tables("Ratios (unpaired: median ÷ median)", ratio_rows,
           "For rates above 1 means ulb-tcp is faster; for latency, memory, CPU and system calls below 1 means it uses less.")

    def paired_rows(keys, tkey):
        rows = [["HAProxy variant used"] + [(res.paired("ulb-tcp", k)[0] or "n/a").replace("HAProxy ", "") for k in keys]]
        for n in ulb_names:
            cells = []
            for k in keys:
                _, ratios = res.paired(n, k)
                if not ratios:
                    cells.append("n/a")
                    continue
                c = ratio_fmt(statistics.median(ratios))
                if len(ratios) > 1:
                    c += f" [{ratio_fmt(min(ratios))}–{ratio_fmt(max(ratios))}]"
                cells.append(c + f" n={len(ratios)}")
            rows.append([f"{n} ÷ HAProxy best"] + cells)
        return rows

    tables("Paired ratios: per round, ÷ HAProxy's best variant of the same round", paired_rows,
           "Median of the per-round ratios [min–max], n = rounds in which both were measured. The variant is the "
           "one with the best median over the run for that figure, used in every round.")

    tables("Every target, median [min–max over rounds]",
           lambda keys, tkey: [[t.name] + [res.cell(t.name, k, spread=True) for k in keys] for t in targets])

    det = [(t.name, res.details[t.name]) for t in targets if res.details[t.name]]
    if det:
        out.append("## S8 details: every system call per connection\n")
        out.append("Median over rounds of calls per connection accepted under the trace; failed calls by errno in "
                   "brackets (per connection).\n")
        for name, by_round in det:
            names = sorted({c for d in by_round.values() for c in d["calls"]})
            per = {}
            for c in names:
                per[c] = statistics.median(d["calls"].get(c, 0) / d["conns"] for d in by_round.values())
            errs = {}
            for d in by_round.values():
                for (c, e), v in d["errors"].items():
                    errs.setdefault((c, e), []).append(v / d["conns"])
            parts = []
            for c in sorted(names, key=lambda c: -per[c]):
                e = ", ".join(f"{en} {statistics.median(v + [0] * (len(by_round) - len(v))):.2f}"
                              for (cn, en), v in sorted(errs.items()) if cn == c)
                parts.append(f"{c} {per[c]:.2f}" + (f" ({e})" if e else ""))
            conns = ", ".join(f"{d['conns']:,}" for d in by_round.values())
            out.append(f"- **{name}** (connections traced per round: {conns}): " + "; ".join(parts))
        out.append("")

    out.append("## Failures and notes\n")
    if not res.failures and not res.notes:
        out.append("None: every measurement succeeded.")
    for rnd, scen, tname, reason in res.failures:
        out.append(f"- FAIL round {rnd}, {scen}, {tname}: {reason}")
    for rnd, scen, tname, note in res.notes:
        out.append(f"- note round {rnd}, {scen}, {tname}: {note}")
    out.append("")
    return "\n".join(out)


def machine_header(args, plain, sock_note):
    def first_line(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired, IndexError):
            return "unknown"

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = open("/proc/loadavg").read().split()[:3]
    except OSError:
        load = ["?"]
    commit = first_line(["git", "-C", REPO, "rev-parse", "--short", "HEAD"])
    dirty = first_line(["git", "-C", REPO, "status", "--porcelain"])
    commit += " (working tree with uncommitted changes)" if dirty not in ("unknown", "") and dirty else ""
    return [
        ("date", datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")),
        ("CPU", f"{cpu}, `nproc` = {os.cpu_count() and first_line(['nproc'])}"),
        ("kernel", first_line(["uname", "-r"])),
        ("load average at start", " ".join(load)),
        ("ulb-tcp", f"commit {commit}, release build"
         + (f"; extra rows for {', '.join(plain)}" if plain else "; no `--copy-mode` flag, so no plain-copy row")),
        ("haproxy", first_line([tool_path("haproxy"), "-v"])),
        ("nginx", first_line([tool_path("nginx"), "-v"])),
        ("wrk", first_line([tool_path("wrk"), "-v"])),
        ("iperf3", first_line([tool_path("iperf3"), "--version"])),
        ("redis", first_line([tool_path("redis-server"), "--version"]) + "; "
         + first_line([tool_path("redis-benchmark"), "--version"])),
        ("strace", first_line([tool_path("strace"), "-V"])),
        ("rustc", first_line(["rustc", "--version"])),
        ("open-file limit", f"{fd_limit():,} for every process started"
         + ("" if fd_limit() >= NOFILE else " (could not be raised further here)")
         + f"; S5 holds {args.hold:,} connections; HAProxy `maxconn {haproxy_maxconn()[0]}`"
         + (f", `maxpipes {haproxy_maxconn()[1]}`" if haproxy_maxconn()[1] else "")),
        ("latency tool", sock_note),
        ("command", "`" + " ".join(["python3", "benches/compare.py"] + [shlex.quote(a) for a in sys.argv[1:]]) + "`"),
        ("rounds × seconds", f"{args.rounds} × {args.seconds} s" + (" (--quick)" if args.quick else "")),
    ]


# ----------------------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each running every scenario for every target (default 3)")
    ap.add_argument("--seconds", type=int, default=4, help="seconds per throughput/rate/latency measurement (default 4)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 round, 2 s, two HAProxy variants, 2,000 held connections, redis -n 200000 "
                         "(-P 16) and 25000 (-P 1); S1-S3 and S7 take about 3 minutes on 2 idle cores")
    ap.add_argument("--out", help="write the Markdown report here (default: print only)")
    ap.add_argument("--hold", type=int, help="connections held for S5 (default 10000, fewer if the open-file limit cannot hold them)")
    ap.add_argument("--latency-rate", type=int, default=5000, help="S4 messages per second (default 5000)")
    ap.add_argument("--latency-connections", type=int, default=10, help="S4 connections (default 10)")
    ap.add_argument("--only", "--scenarios", dest="only", metavar="LIST",
                    help="comma-separated scenarios to run: name prefixes or, from 3 letters on, words in the name, "
                         "e.g. 'S1,S4', 'S2,S3', 'redis', '-t1', 'syscalls' (default all)")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=FLAGS",
                    help="an extra row 'ulb-tcp LABEL' started with these extra flags, e.g. "
                         "'1 thread=--threads 1'; repeatable")
    ap.add_argument("--program", action="append", default=[], metavar="LABEL=COMMAND",
                    help="an extra row LABEL: any forwarder started with COMMAND, in which {listen} and {backend} "
                         "stand for the two addresses (127.0.0.1:PORT), e.g. 'uring=/tmp/proto --listen {listen} "
                         "--backend {backend}'; repeatable")
    ap.add_argument("--skip", default="", metavar="NAMES",
                    help="comma-separated target names to leave out, e.g. 'ulb-tcp splice,HAProxy 1t' "
                         "(direct and ulb-tcp always run)")
    ap.add_argument("--redis-n16", type=int, metavar="N", help="redis-benchmark -n with -P 16 (default 400000 × --seconds)")
    ap.add_argument("--redis-n1", type=int, metavar="N", help="redis-benchmark -n with -P 1 (default 40000 × --seconds)")
    ap.add_argument("--syscall-seconds", type=int, default=2, help="length of the traced wrk run of S8 (default 2)")
    ap.add_argument("--syscall-targets", default="ulb-tcp,HAProxy 1t", metavar="NAMES",
                    help="comma-separated targets S8 traces (default 'ulb-tcp,HAProxy 1t')")
    ap.add_argument("--gate-foreign-cpu", type=float, metavar="CORES",
                    help="redo a measurement during which processes other than ours used more than CORES cores "
                         "(from /proc; e.g. 0.15; default off)")
    ap.add_argument("--gate-redos", type=int, default=2, metavar="N",
                    help="with --gate-foreign-cpu, redo one measurement at most N times (default 2), then keep it with a note")
    args = ap.parse_args()
    raise_nofile()
    # A balancer holding N connections needs 2 N descriptors (plus HAProxy's pipes): stay below the limit, and
    # below ulb-tcp's default --max-connections at this limit, (L - 64) * 3/8 (7,476 at 20,000): past it the
    # rest would wait in the backlog and the holder would never be ready.
    lim = fd_limit()
    fit = max(100, min((lim - 1200) // 2, (lim - 64) * 3 // 8 - 100) // 500 * 500)
    if args.quick:
        args.rounds, args.seconds = 1, 2
        # Counts, not time, bound a redis-benchmark run: small ones keep --quick short on a loaded machine too.
        args.redis_n16 = args.redis_n16 or 200_000
        args.redis_n1 = args.redis_n1 or 25_000
    if args.hold is None:
        args.hold = min(2_000 if args.quick else 10_000, fit)
    elif args.hold > fit:
        log(f"--hold {args.hold} does not fit the open-file limit {fd_limit()}; holding {fit}")
        args.hold = fit
    if args.rounds < 1 or args.seconds < 1 or args.hold < 1 or args.syscall_seconds < 1 or args.gate_redos < 0:
        ap.error("--rounds, --seconds, --hold and --syscall-seconds must be at least 1, --gate-redos at least 0")
    started = time.monotonic()
    ensure_tools()
    sock_note = sockperf_note()
    tmp = tempfile.mkdtemp(prefix="ulb-compare-")
    procs = Procs(tmp)
    interrupted = False

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        bins = build(tmp)
        skip = [n.strip() for n in args.skip.split(",") if n.strip()]
        targets, plain = make_targets(bins, args.quick, args.variant, skip, args.program)
        header = machine_header(args, plain, sock_note)
        env = Env(tmp, procs, bins, args)
        res = Results(targets)
        scens = scenarios(env)
        if args.only:
            scens = select_scenarios(scens, args.only)
            if not scens:
                ap.error(f"--only {args.only!r} selects no scenario")
        # Start only the backends the chosen scenarios use.
        uses = {"S1": "iperf3", "S2": "nginx", "S3": "nginx", "S8": "nginx", "S4": "echo", "S5": "echo", "S7": "redis"}
        for kind in sorted({uses[sc.name[:2]] for sc in scens}):
            env.backend(kind)
        log(f"targets: {', '.join(t.name for t in targets)}; {args.rounds} rounds × {len(scens)} scenarios "
            f"({', '.join(sc.name for sc in scens)})")

        def measure(rnd, sc, t):
            """One measurement, redone while foreign load exceeds the gate, at most --gate-redos times; after the
            last redo the attempt with the least foreign load is kept."""
            tries = []  # (foreign cores, values)
            while True:
                before = cpu_snapshot()
                vals = sc.fn(t)
                tries.append((foreign_cores(before, cpu_snapshot()), vals))
                gate = args.gate_foreign_cpu
                if gate is None or tries[-1][0] <= gate or len(tries) > args.gate_redos:
                    break
                log(f"round {rnd} {sc.name} {t.name}: other processes used {tries[-1][0]:.2f} cores; redoing it")
            if gate is None or tries[-1][0] <= gate:
                kept = len(tries) - 1  # the one that passed
            else:
                kept = min(range(len(tries)), key=lambda i: tries[i][0])
            foreign, vals = tries[kept]
            if len(tries) > 1:
                over = f", still over {gate} after {args.gate_redos} redos" if foreign > gate else ""
                vals.setdefault("_notes", []).append(
                    f"redone for foreign load: other processes used " + ", ".join(f"{c:.2f}" for c, _ in tries)
                    + f" cores in the {len(tries)} attempts; kept attempt {kept + 1} ({foreign:.2f}{over})")
            res.foreign.append((rnd, sc.name, t.name, foreign, len(tries) - 1))
            return vals

        spent = {}  # scenario family ("S1", ...) -> seconds
        try:
            for rnd in range(1, args.rounds + 1):
                off = (rnd - 1) % len(targets)
                order = targets[off:] + targets[:off]
                log(f"round {rnd}: target order {', '.join(t.name for t in order)}")
                for sc in scens:
                    for t in order:
                        if not sc.applies(t):
                            continue
                        t0 = time.monotonic()
                        try:
                            vals = measure(rnd, sc, t)
                        except Failure as e:
                            spent[sc.name[:2]] = spent.get(sc.name[:2], 0) + time.monotonic() - t0
                            log(f"FAIL round {rnd} {sc.name} {t.name}: {e}")
                            res.failures.append((rnd, sc.name, t.name, str(e)))
                            for k in sc.expected(t):
                                res.failed[t.name][k].append(rnd)
                            continue
                        except Exception as e:  # a bug or an unexpected output: keep going with the others
                            spent[sc.name[:2]] = spent.get(sc.name[:2], 0) + time.monotonic() - t0
                            log(f"FAIL round {rnd} {sc.name} {t.name}: unexpected {type(e).__name__}: {e}")
                            res.failures.append((rnd, sc.name, t.name, f"unexpected {type(e).__name__}: {e}"))
                            for k in sc.expected(t):
                                res.failed[t.name][k].append(rnd)
                            continue
                        spent[sc.name[:2]] = spent.get(sc.name[:2], 0) + time.monotonic() - t0
                        for note in vals.pop("_notes", []):
                            res.notes.append((rnd, sc.name, t.name, note))
                        detail = vals.pop("_detail", None)
                        if detail is not None:
                            res.details[t.name][rnd] = detail
                        for k, v in vals.items():
                            if v is not None:
                                res.values[t.name][k][rnd] = v
                        shown = ", ".join(f"{k}={fmt(v, k)}" for k, v in vals.items() if v is not None)
                        log(f"round {rnd} {sc.name} {t.name}: {shown or 'n/a'} (foreign load {res.foreign[-1][3]:.2f} cores)")
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted: reporting what was measured so far")
        if spent:
            header.append(("time per scenario", ", ".join(f"{k} {v:.0f} s" for k, v in sorted(spent.items()))
                           + f" (all measurements {sum(spent.values()) / 60:.1f} min)"))
        header.append(("load average at end", " ".join(open("/proc/loadavg").read().split()[:3])))
        if res.foreign:
            cores = [f[3] for f in res.foreign]
            redos = sum(f[4] for f in res.foreign)
            header.append(("foreign load", f"other processes used {statistics.median(cores):.2f} cores (median over "
                           f"{len(cores)} measurements), {max(cores):.2f} at most"
                           + (f"; {redos} measurements redone (gate {args.gate_foreign_cpu} cores)"
                              if args.gate_foreign_cpu is not None else "; gating off")))
        text = report(res, targets, plain, header, args, time.monotonic() - started)
        if interrupted:
            text = text.replace("## Machine and run", "**Interrupted: incomplete.**\n\n## Machine and run", 1)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
            log(f"wrote {args.out}")
        return 1 if interrupted else 0
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
