#!/usr/bin/env python3
"""Whole-machine CPU per request through each forwarder: the sockmap path moves work from the
forwarder's process into kworker threads and softirq, which a per-process figure does not see.

    python3 machine_cpu.py [--rounds 3] [--bin PATH] [--ulb PATH] [--only redis1,redis16,wrk]

For each round, workload and target (the order rotates every round): start the backend (redis-server,
or nginx for wrk) and the target fresh, run a fixed load (redis-benchmark -c 50 -t get,set -n N -P 1
or -P 16; wrk -t2 -c50 -d4s keep-alive), and read around the run:
  machine  /proc/stat user+nice+system+irq+softirq (all CPUs): µs per request
  fwd      the target's utime+stime (/proc/PID/stat, all threads): µs per request
  kworker  utime+stime of every kworker thread: µs per request
  foreign  cores used by processes that are neither ours (target, backend, load tool) nor kworkers
Prints one line per measurement and a table of medians. Loopback only; every process started is
stopped and waited for.
"""

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

TCK = os.sysconf("SC_CLK_TCK")
HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, deadline=10.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} not listening")


def stop(p):
    if p and p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def proc_cpu(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            v = f.read()
        v = v[v.rindex(")") + 2:].split()
        return (int(v[11]) + int(v[12])) / TCK
    except (OSError, ValueError):
        return 0.0


def kworkers():
    """{pid: cpu seconds} of every kworker thread."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                v = f.read()
        except OSError:
            continue
        comm = v[v.index("(") + 1:v.rindex(")")]
        if comm.startswith("kworker"):
            f = v[v.rindex(")") + 2:].split()
            out[d] = (int(f[11]) + int(f[12])) / TCK
    return out


def machine():
    with open("/proc/stat") as f:
        x = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal
    return sum(x[0:3]) / TCK, (x[5] + x[6]) / TCK


def snapshot(fwd_pid, be_pid):
    m, irq = machine()
    t = os.times()
    fwd, be = proc_cpu(fwd_pid), proc_cpu(be_pid)
    return {
        "t": time.monotonic(),
        "m": m,
        "irq": irq,
        "fwd": fwd,
        "ours": fwd + be,
        "children": t.children_user + t.children_system,
        "kw": kworkers(),
    }


def delta(a, b):
    kw = sum(v - a["kw"].get(k, 0.0) for k, v in b["kw"].items())
    dt = b["t"] - a["t"]
    ours = (b["ours"] - a["ours"]) + (b["children"] - a["children"])
    return {
        "dt": dt,
        "machine": (b["m"] - a["m"]) + (b["irq"] - a["irq"]),
        "kworker": kw,
        "fwd": b["fwd"] - a["fwd"],
        "foreign": max(0.0, (b["m"] - a["m"]) - ours - kw) / dt,
        "softirq": b["irq"] - a["irq"],
    }


HAPROXY_CFG = """global
    maxconn 2000
    nbthread {threads}
defaults
    mode tcp
    timeout client 5m
    timeout server 5m
    timeout connect 5s
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    server s1 127.0.0.1:{backend}
"""


def start_target(target, args, tmp, backend):
    port = free_port()
    kind, _, opt = target.partition(":")
    if kind == "userspace":
        cmd = [args.bin, "--mode", "userspace"]
    elif kind == "sockmap":
        cmd = [args.bin, "--mode", "sockmap", "--attach", opt or "verdict"]
    elif kind == "ulb":
        cmd = [args.ulb, "--backends", f"127.0.0.1:{backend}", "--drain-timeout", "1s"]
    elif kind == "haproxy":
        cfg = os.path.join(tmp, f"haproxy-{port}.cfg")
        with open(cfg, "w") as f:
            f.write(HAPROXY_CFG.format(threads=opt or "1", port=port, backend=backend))
        cmd = ["haproxy", "-db", "-f", cfg]
    else:
        raise SystemExit(f"unknown target {target}")
    if kind in ("userspace", "sockmap"):
        cmd += ["--listen", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{backend}"]
    elif kind == "ulb":
        cmd += ["--listen", f"127.0.0.1:{port}"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env=dict(os.environ, RUST_LOG="warn"))
    wait_port(port, p)
    return p, port


def start_backend(kind, tmp):
    port = free_port()
    if kind.startswith("redis"):
        p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", tmp],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        root = tempfile.mkdtemp(dir=tmp)
        conf = os.path.join(root, "nginx.conf")
        temps = "\n".join(f"    {d}_temp_path {root}/{d};" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        with open(conf, "w") as f:
            f.write(f"""daemon off;
master_process off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 10000; multi_accept on; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
{temps}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = / {{ return 200 "ok\\n"; }}
    }}
}}
""")
        p = subprocess.Popen(["nginx", "-c", conf, "-p", root], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, p)
    return p, port


def run_load(kind, port, args):
    """Returns (requests, {name: rate})."""
    if kind.startswith("redis"):
        pipe = "16" if kind == "redis16" else "1"
        n = args.n16 if pipe == "16" else args.n1
        r = subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "get,set", "-c", "50",
                            "-P", pipe, "-n", str(n), "-q"], capture_output=True, text=True, timeout=120)
        rates = {}
        for line in r.stdout.replace("\r", "\n").splitlines():
            m = re.match(r"^(GET|SET): ([\d.]+) requests per second", line)
            if m:
                rates[m.group(1)] = float(m.group(2))
        if len(rates) != 2:
            raise RuntimeError(f"redis-benchmark: {r.stdout[-300:]} {r.stderr[-300:]}")
        return 2 * n, rates
    r = subprocess.run(["wrk", "-t2", "-c50", f"-d{args.seconds}s", f"http://127.0.0.1:{port}/"],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"(\d+) requests in", r.stdout)
    rs = re.search(r"Requests/sec:\s+([\d.]+)", r.stdout)
    if not m or not rs:
        raise RuntimeError(f"wrk: {r.stdout[-300:]} {r.stderr[-300:]}")
    return int(m.group(1)), {"req/s": float(rs.group(1))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--n1", type=int, default=100_000, help="redis-benchmark -n per test with -P 1")
    ap.add_argument("--n16", type=int, default=1_000_000, help="redis-benchmark -n per test with -P 16")
    ap.add_argument("--bin", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(HERE, "target")),
                                                  "release", "sockmap-forward"))
    ap.add_argument("--ulb", default=None, help="ulb-tcp binary (a target 'ulb' when given)")
    ap.add_argument("--targets", default="userspace,sockmap:verdict,sockmap:stream,sockmap:stream-parser,haproxy:1")
    ap.add_argument("--only", default="redis1,redis16,wrk")
    args = ap.parse_args()
    targets = args.targets.split(",")
    if args.ulb:
        targets.append("ulb")
    loads = args.only.split(",")
    res = {}  # (load, target) -> list of dict
    tmp = tempfile.mkdtemp(prefix="machine-cpu-")
    print(f"# start {time.strftime('%Y-%m-%d %H:%M:%S')} load average {os.getloadavg()}", flush=True)
    try:
        for rnd in range(args.rounds):
            for load in loads:
                order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
                for t in order:
                    be = tp = None
                    try:
                        be, bport = start_backend(load, tmp)
                        tp, port = start_target(t, args, tmp, bport)
                        a = snapshot(tp.pid, be.pid)
                        reqs, rates = run_load(load, port, args)
                        b = snapshot(tp.pid, be.pid)
                        d = delta(a, b)
                        row = {
                            "rates": rates,
                            "machine_us": d["machine"] / reqs * 1e6,
                            # The machine less what other processes used meanwhile.
                            "ours_us": (d["machine"] - d["foreign"] * d["dt"]) / reqs * 1e6,
                            "softirq_us": d["softirq"] / reqs * 1e6,
                            "kworker_us": d["kworker"] / reqs * 1e6,
                            "fwd_us": d["fwd"] / reqs * 1e6,
                            "foreign": d["foreign"],
                            "load": os.getloadavg()[0],
                        }
                        res.setdefault((load, t), []).append(row)
                        rs = " ".join(f"{k}={v:,.0f}" for k, v in rates.items())
                        print(f"round {rnd + 1} {load} {t}: {rs} machine={row['machine_us']:.2f}µs/req "
                              f"machine-less-foreign={row['ours_us']:.2f} softirq={row['softirq_us']:.2f} "
                              f"fwd={row['fwd_us']:.2f} kworker={row['kworker_us']:.2f} "
                              f"foreign={row['foreign']:.2f} cores load={row['load']:.2f}", flush=True)
                    except Exception as e:  # one failed measurement: reported, the rest goes on
                        print(f"round {rnd + 1} {load} {t}: FAILED {e}", flush=True)
                    finally:
                        stop(tp)
                        stop(be)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"# end {time.strftime('%Y-%m-%d %H:%M:%S')} load average {os.getloadavg()}")
    print("\n| workload | target | rates (median) | machine µs/req | machine less foreign µs/req | "
          "in process µs/req | kworker µs/req | irq+softirq µs/req | foreign cores |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for load in loads:
        for t in targets:
            rows = res.get((load, t), [])
            if not rows:
                continue
            med = lambda k: statistics.median(r[k] for r in rows)
            rates = " / ".join(f"{k} {statistics.median(r['rates'][k] for r in rows):,.0f}" for k in rows[0]["rates"])
            print(f"| {load} | {t} | {rates} | {med('machine_us'):.2f} | {med('ours_us'):.2f} | "
                  f"{med('fwd_us'):.2f} | {med('kworker_us'):.2f} | {med('softirq_us'):.2f} | "
                  f"{med('foreign'):.2f} |")


if __name__ == "__main__":
    sys.exit(main())
