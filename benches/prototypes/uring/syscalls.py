#!/usr/bin/env python3
"""System calls per request of forwarders, keep-alive and Connection: close, counted with `strace -f -c`.

    python3 benches/prototypes/uring/syscalls.py [--seconds 2] LABEL=COMMAND...

COMMAND has {listen} and {backend} like benches/compare.py's --program; 'ulb-tcp' and 'haproxy' as COMMAND
start those (the binary at $CARGO_TARGET_DIR/release/ulb-tcp, HAProxy 1 thread as compare.py configures it).
For every target and both kinds of load: start nginx (compare.py's), the target, `strace -f -c -p PID`,
`wrk -t2 -c50 -dNs` (with or without "Connection: close"), stop strace (SIGINT: it prints its summary),
divide each call count by wrk's completed requests. With Connection: close one request is one connection.
Under strace the target runs slower, so timing-dependent counts (io_uring_enter, epoll_wait, EAGAIN
reads) come out lower than untraced. Reuses compare.py's helpers (imported, not changed); stops and
waits for every process it starts.
"""

import argparse
import os
import re
import shutil
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import compare  # noqa: E402  (benches/compare.py)

SUMMARY = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?([a-z_0-9]+)\s*$")


def parse_summary(text):
    calls = {}
    for line in text.splitlines():
        m = SUMMARY.match(line)
        if m:
            calls[m.group(3)] = int(m.group(1))
    return calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=2)
    ap.add_argument("targets", nargs="+", metavar="LABEL=COMMAND")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="uring-sc-")
    procs = compare.Procs(tmp)
    ulb = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(compare.REPO, "target")), "release", "ulb-tcp")
    rows = []
    try:
        _, bport = compare.start_nginx(procs, tmp)
        for spec in a.targets:
            label, _, command = spec.partition("=")
            for close in (False, True):
                port = compare.free_port()
                listen, backend = f"127.0.0.1:{port}", f"127.0.0.1:{bport}"
                if command == "ulb-tcp":
                    cmd = [ulb, "--listen", listen, "--backends", backend]
                elif command == "haproxy":
                    cfg = os.path.join(tmp, f"haproxy-{port}.cfg")
                    with open(cfg, "w") as f:
                        f.write(compare.haproxy_cfg(port, bport, 1, False))
                    cmd = [compare.tool_path("haproxy"), "-db", "-f", cfg]
                else:
                    cmd = [w.replace("{listen}", listen).replace("{backend}", backend) for w in command.split()]
                bal = procs.start(label, cmd)
                compare.wait_listening(procs, bal, port)
                out = os.path.join(tmp, f"strace-{port}.txt")
                tracer = procs.start("strace", [compare.tool_path("strace"), "-f", "-c", "-o", out, "-p", str(bal.pid)])
                deadline = time.monotonic() + 10
                while "attached" not in procs.output(tracer):
                    if tracer.poll() is not None or time.monotonic() > deadline:
                        raise compare.Failure(f"strace did not attach: {procs.output(tracer)}")
                    time.sleep(0.05)
                time.sleep(0.2)
                wrk = [compare.tool_path("wrk"), "-t2", "-c50", f"-d{a.seconds}s"]
                if close:
                    wrk += ["-H", "Connection: close"]
                r = compare.run(wrk + [f"http://127.0.0.1:{port}/"], timeout=a.seconds + 30)
                time.sleep(1.0)
                tracer.send_signal(signal.SIGINT)
                tracer.wait(timeout=15)
                procs.stop(tracer)
                procs.stop(bal)
                _, reqs, _ = compare.parse_wrk(r)
                with open(out) as f:
                    calls = parse_summary(f.read())
                calls.pop("total", None)
                total = sum(calls.values())
                top = sorted(calls.items(), key=lambda kv: -kv[1])[:8]
                detail = ", ".join(f"{k} {v / reqs:.2f}" for k, v in top)
                kind = "close" if close else "keep-alive"
                rows.append((label, kind, reqs, total / reqs, detail))
                print(f"{label:24} {kind:10} {reqs:>9,} req  {total / reqs:6.2f} calls/req  ({detail})", flush=True)
    finally:
        for p in list(procs.live):
            procs.stop(p)
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print("| target | load | requests (traced) | system calls per request | largest (per request) |")
    print("|---|---|---|---|---|")
    for label, kind, reqs, per, detail in rows:
        print(f"| {label} | {kind} | {reqs:,} | {per:.2f} | {detail} |")


if __name__ == "__main__":
    main()
