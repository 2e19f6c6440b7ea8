#!/usr/bin/env python3
"""Side-by-side broker benchmark (issue 9): plain Mosquitto vs the plugin validating
(backend_url none) vs the plugin forwarding to nginx, QoS 0 and 1, from ONE run.

    ROUNDS=5 MESSAGES=60000 scripts/bench.py        (or: make bench)

Load: `mosquitto_pub -l` (one device, ~235-byte envelopes pre-signed by
examples/bench_envelopes.rs before each round, never inside the timed region) and
`mosquitto_sub -C N` counting, on the same mutual-TLS listener config for all three brokers.
The brokers take turns in an order that rotates every round, so none always goes first.
Rate = messages / (publisher start -> subscriber got all N); for forwarding also until nginx
logged all N requests. Broker CPU per message = broker thread's utime+stime delta
(/proc/PID/task/PID/stat) / N. Drain: a QoS 0 burst of N queued while nginx is down, then
nginx started: N / (first -> last request time in nginx's access log, $msec). Latency:
LAT_MESSAGES (5000) paced at LAT_RATE (1000) msg/s, publish -> nginx log; EXPIRY_BURST=N first
sends N messages whose ids all leave the replay window in the same second, 2 s into that run.
PLUGIN=path runs another build in place of target/release's; KEEP=1 keeps the temp directory
(configurations, broker logs, nginx's access log). Everything on
loopback, bounded (timeouts on every wait), every process it starts is stopped at exit.
"""
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (access_lines, free_port, proc_cpu, run, split_conf,  # noqa: E402
                      steal_seconds, thread_cpus, write_nginx_conf)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS = int(os.environ.get("ROUNDS", "5"))
N = int(os.environ.get("MESSAGES", "60000"))
TIMEOUT = float(os.environ.get("BENCH_TIMEOUT", "120"))
REL = os.path.join(ROOT, "target", "release")
DEVICE = "bench_000"
SECRET = "bench-secret-0123456789abcdef"
TOLERANCE = 300  # the plugin's default timestamp_tolerance

procs = []


def wait_port(port, proc, log):
    deadline = time.time() + 10
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"process exited early; log:\n{open(log).read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"port {port} not ready in 10 s; log:\n{open(log).read()}")


def start(args, log):
    p = subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    procs.append(p)
    return p


def stop(p):
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def thread_cpu(pid):
    """Broker thread (the main thread) CPU seconds."""
    return proc_cpu(pid, pid)


def main():
    for tool in ("mosquitto", "mosquitto_pub", "mosquitto_sub", "nginx", "openssl"):
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            sys.exit(f"{tool} not found (make deps; nginx: apt-get install nginx-light)")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    env = dict(os.environ)
    run("cargo", "build", "-q", "--release", cwd=ROOT)
    run("cargo", "build", "-q", "--release", "--example", "bench_envelopes", cwd=ROOT)
    d = tempfile.mkdtemp(prefix="iotgw-bench.")
    os.chmod(d, 0o755)
    try:
        bench(d, nginx, env)
    finally:
        for p in procs:
            stop(p)
        if os.environ.get("KEEP"):
            print(f"kept {d}", flush=True)
        else:
            shutil.rmtree(d, ignore_errors=True)


def cpu_by_thread(pid, threads0, ng_pid, ng0):
    """CPU µs per message since `threads0` (thread_cpus) and `ng0` (nginx), by thread name."""
    spent = {k: (v - threads0.get(k, 0.0)) * 1e6 / N for k, v in thread_cpus(pid).items()}
    spent["nginx"] = ((proc_cpu(ng_pid) - ng0) * 1e6 / N) if ng_pid else 0.0
    return ", ".join(f"{k} {v:.1f}" for k, v in sorted(spent.items()) if v >= 0.05)


def bench(d, nginx, env):
    gw = os.path.join(d, "gw")
    plugin = os.environ.get("PLUGIN") or os.path.join(REL, "libsecure_iot_gateway.so")
    iotgw = os.path.join(REL, "iotgw")
    # BASE_PLUGIN=/path/old.so: also run that build validating ("base"), for before/after
    # figures from the same run.
    base_so = os.environ.get("BASE_PLUGIN")
    ports = {k: free_port() for k in ("plain", "valid", "fwd", "nginx", "base")}
    run(iotgw, "init", gw, "--port", "1", "--bind", "127.0.0.1", "--plugin", plugin,
        "--backend-url", "http://127.0.0.1:1/x", stdout=subprocess.DEVNULL)
    run(iotgw, "device", "add", DEVICE, "--dir", gw, "--secret", SECRET, stdout=subprocess.DEVNULL)
    # The subscriber: a service identity (acl_file lets it read device data), same CA.
    sub_key, sub_pem = os.path.join(d, "dash.key"), os.path.join(d, "dash.pem")
    run("openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=dashboard",
        "-keyout", sub_key, "-out", sub_pem + ".csr", stderr=subprocess.DEVNULL)
    run("openssl", "x509", "-req", "-in", sub_pem + ".csr", "-CA", f"{gw}/ca.pem", "-CAkey",
        f"{gw}/ca.key", "-CAcreateserial", "-days", "2", "-out", sub_pem, stderr=subprocess.DEVNULL)
    tls, common = split_conf(gw)
    # Same user for all three (the plugin writes its outbox under the temp dir).
    common += ["log_type error", "log_type warning", "log_type notice", "user root"]
    # The plain broker's acl_file gives the device what the plugin would: write its data topic.
    with open(f"{gw}/acl.plain", "w") as f:
        f.write(open(f"{gw}/acl").read() + f"\nuser {DEVICE}\ntopic write device/{DEVICE}/data\n")
    backend = f"http://127.0.0.1:{ports['nginx']}/device/{{device_id}}/data"
    confs = {
        "plain": [f"acl_file {gw}/acl.plain"],
        "valid": [f"acl_file {gw}/acl", f"plugin {plugin}", "plugin_opt_backend_url none"],
        "fwd": [f"acl_file {gw}/acl", f"plugin {plugin}", f"plugin_opt_backend_url {backend}"],
    }
    if base_so:
        confs["base"] = [f"acl_file {gw}/acl", f"plugin {base_so}", "plugin_opt_backend_url none"]
    brokers = {}
    for name, extra in confs.items():
        lines = common + extra
        if name != "plain":
            lines += [f"plugin_opt_db_path {gw}/devices.db",
                      f"plugin_opt_spool_path {d}/{name}-outbox",
                      "plugin_opt_service_identities dashboard",
                      # Every round's ids stay inside the window: room for all of them.
                      "plugin_opt_replay_cache_size 10000000",
                      "plugin_opt_spool_max_bytes 8589934592"]
        lines += [f"listener {ports[name]} 127.0.0.1"] + tls
        conf = os.path.join(d, f"{name}.conf")
        with open(conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        log = os.path.join(d, f"{name}.log")
        p = start(["mosquitto", "-c", conf], log)
        wait_port(ports[name], p, log)
        brokers[name] = p

    ngconf, access = write_nginx_conf(d, ports["nginx"], "$msec", 256)
    ng = None

    def nginx_start():
        p = start([nginx, "-c", ngconf, "-p", d], os.path.join(d, "nginx.out"))
        wait_port(ports["nginx"], p, os.path.join(d, "nginx-error.log"))
        return p

    ng = nginx_start()
    dev = [f"--cafile", f"{gw}/ca.pem", "--cert", f"{gw}/devices/{DEVICE}.pem", "--key",
           f"{gw}/devices/{DEVICE}.key"]
    sub = ["--cafile", f"{gw}/ca.pem", "--cert", sub_pem, "--key", sub_key]

    def load(name, qos, path, backend_before=None):
        """One timed run: returns (msg/s, received, broker µs/msg, backend-side msg/s or None)."""
        port = str(ports[name])
        got = os.path.join(d, "sub.out")
        # -d: the SUBACK line says the subscription is in place (readiness), and each message
        # is counted by its "received PUBLISH" line.
        s = subprocess.Popen(["stdbuf", "-oL", "mosquitto_sub", "-d", "-h", "127.0.0.1", "-p", port, *sub, "-t",
                              f"device/{DEVICE}/data", "-q", str(qos), "-C", str(N), "-W",
                              str(int(TIMEOUT))], stdout=open(got, "w"))
        procs.append(s)
        deadline = time.time() + 10
        while "received SUBACK" not in open(got).read():
            if time.time() > deadline or s.poll() is not None:
                sys.exit(f"subscriber not subscribed in 10 s:\n{open(got).read()}")
            time.sleep(0.02)
        pid = brokers[name].pid
        # PERF=DIR: profile the broker thread during each run (perf record -g) into DIR.
        rec = None
        if os.environ.get("PERF"):
            rec = subprocess.Popen(["perf", "record", "-q", "-g", "-t", str(pid), "-o",
                                    os.path.join(os.environ["PERF"], f"{name}-qos{qos}.data")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(rec)
            time.sleep(0.3)
        ng_pid = ng.pid if ng is not None and ng.poll() is None else None
        threads0 = thread_cpus(pid)
        ng0 = proc_cpu(ng_pid) if ng_pid else 0.0
        c0, t0, steal0 = thread_cpu(pid), time.time(), steal_seconds()
        with open(path) as inp:
            subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", port, *dev, "-t",
                            f"device/{DEVICE}/data", "-q", str(qos), "-l"], stdin=inp,
                           check=True, timeout=TIMEOUT)
        s.wait(TIMEOUT + 5)
        t1 = time.time()
        received = sum(1 for l in open(got) if "received PUBLISH" in l)
        end = t1
        be_rate = None
        if backend_before is not None:
            deadline = time.time() + TIMEOUT
            while len(access_lines(access)) < backend_before + N and time.time() < deadline:
                time.sleep(0.05)
            lines = access_lines(access)
            if len(lines) >= backend_before + N:
                last = float(lines[backend_before + N - 1])
                end = max(t1, last)
                be_rate = N / (last - t0)
        c1 = thread_cpu(pid)
        if name != "plain":
            # Where the rest of the CPU went: the plugin's threads (by name) and nginx.
            print(f"  {name} QoS {qos} CPU µs/msg by thread: "
                  + cpu_by_thread(pid, threads0, ng_pid, ng0), flush=True)
        # A VM's host can take the CPUs away mid-run; say so, since it skews that run alone.
        steal = steal_seconds() - steal0
        if steal >= 0.05:
            print(f"  {name} QoS {qos}: the host took {steal * 1000:.0f} ms of CPU time "
                  f"(steal) during this {end - t0:.1f} s run", flush=True)
        if rec is not None:
            rec.send_signal(signal.SIGINT)
            rec.wait(30)
        return received / (end - t0), received, (c1 - c0) * 1e6 / N, be_rate

    print(f"bench: {ROUNDS} rounds x {N} messages, one device, envelopes "
          f"~{235} bytes, mutual TLS, loopback; rates in msg/s, CPU = broker thread µs/msg",
          flush=True)
    rows = []
    drains = []
    for r in range(ROUNDS):
        for qos in (0, 1):
            path = os.path.join(d, "env.txt")
            with open(path, "w") as f:
                run(os.path.join(REL, "examples", "bench_envelopes"), SECRET, DEVICE, str(N),
                    str(int(time.time())), f"{r:02x}{qos:02x}{os.getpid() & 0xffff:04x}", stdout=f)
            res = {}
            # The order rotates every round: no build always runs first or right after the
            # forwarding broker, whose nginx and worker leave the caches and scheduler changed.
            names = ("plain", "valid", "fwd") + (("base",) if base_so else ())
            k = (2 * r + qos) % len(names)
            for name in names[k:] + names[:k]:
                before = len(access_lines(access)) if name == "fwd" else None
                res[name] = load(name, qos, path, before)
            row = (r + 1, qos, res)
            rows.append(row)
            pl, va, fw = res["plain"], res["valid"], res["fwd"]
            lost = {k: N - v[1] for k, v in res.items() if v[1] != N}
            print(f"round {r+1} QoS {qos}: plain {pl[0]:8.0f} | valid {va[0]:8.0f} ({va[0]/pl[0]:.2f}x) "
                  f"| fwd {fw[0]:8.0f} ({fw[0]/pl[0]:.2f}x, backend {fw[3] or 0:7.0f}) | CPU "
                  f"{pl[2]:5.1f} / {va[2]:5.1f} / {fw[2]:5.1f} µs"
                  + (f" | base build validating {res['base'][0]:8.0f} ({res['base'][0]/pl[0]:.2f}x, "
                     f"{res['base'][2]:5.1f} µs)" if base_so else "")
                  + (f" | LOST {lost}" if lost else ""), flush=True)
            for name in lost:
                # Why: Mosquitto drops QoS 1 messages for a subscriber more than
                # max_queued_messages (1,000) behind; anything else is in the broker's log too.
                log = open(os.path.join(d, f"{name}.log"), errors="replace").read().splitlines()
                said = [l for l in log if "dropped" in l or "internal error" in l
                        or "out of memory" in l]
                print(f"  {name}: {len(said)} lines of its log about drops or errors"
                      + (f", first: {said[0]}" if said else ""), flush=True)
        # Drain: nginx down, a QoS 0 burst accepted into the outbox, then nginx up.
        path = os.path.join(d, "env.txt")
        with open(path, "w") as f:
            run(os.path.join(REL, "examples", "bench_envelopes"), SECRET, DEVICE, str(N),
                str(int(time.time())), f"{r:02x}ff{os.getpid() & 0xffff:04x}", stdout=f)
        stop(ng)
        before = len(access_lines(access))
        load("fwd", 0, path)
        ng = nginx_start()
        fpid = brokers["fwd"].pid
        threads0, ng0 = thread_cpus(fpid), proc_cpu(ng.pid)
        deadline = time.time() + TIMEOUT
        while len(access_lines(access)) < before + N and time.time() < deadline:
            time.sleep(0.1)
        print("  drain CPU µs/msg by thread: " + cpu_by_thread(fpid, threads0, ng.pid, ng0),
              flush=True)
        lines = access_lines(access)[before:]
        if len(lines) >= N:
            first, last = float(lines[0]), float(lines[N - 1])
            drains.append(N / max(last - first, 1e-3))
            print(f"round {r+1} drain: {N} queued while the backend was down, drained at "
                  f"{drains[-1]:8.0f} msg/s ({last-first:.2f} s)", flush=True)
        else:
            print(f"round {r+1} drain: only {len(lines)} of {N} delivered in {TIMEOUT} s", flush=True)

    # Latency: publish -> backend at a paced LAT_RATE msg/s (QoS 1, forwarding broker). The
    # pacer notes when it hands each line to mosquitto_pub; nginx logs when each request ended
    # ($msec, millisecond resolution); one device = one lane, so the order is the same.
    rate, count = int(os.environ.get("LAT_RATE", "1000")), int(os.environ.get("LAT_MESSAGES", "5000"))
    start_at = 0.0
    burst = int(os.environ.get("EXPIRY_BURST", "0"))
    if burst:
        # Stamped so that the default 300 s tolerance still accepts them while they are sent
        # (20 s, and 1 s more per 2,000): all their ids leave the window at once, when the
        # clock passes ts + 300.
        ts = int(time.time()) - TOLERANCE + 20 + burst // 2000
        path = os.path.join(d, "burst.txt")
        with open(path, "w") as f:
            run(os.path.join(REL, "examples", "bench_envelopes"), SECRET, DEVICE, str(burst),
                str(ts), f"b0b5{os.getpid() & 0xffff:04x}", stdout=f)
        before = len(access_lines(access))
        # mosquitto_pub -l stops early past 65,535 messages at QoS 1 (its 16-bit message ids
        # wrap and it takes an early PUBACK for its last one): one publisher per 60,000.
        lines = open(path).read().splitlines(keepends=True)
        for at in range(0, burst, 60000):
            run("mosquitto_pub", "-h", "127.0.0.1", "-p", str(ports["fwd"]), *dev,
                "-t", f"device/{DEVICE}/data", "-q", "1", "-l",
                input="".join(lines[at:at + 60000]), text=True)
        deadline = time.time() + TIMEOUT
        while len(access_lines(access)) < before + burst and time.time() < deadline:
            time.sleep(0.05)
        start_at = ts + TOLERANCE + 1 - 2
        got = len(access_lines(access)) - before
        print(f"expiry burst: {got} of {burst} delivered; their ids expire at "
              f"{time.strftime('%H:%M:%S', time.localtime(ts + TOLERANCE + 1))}, "
              f"{start_at - time.time() + 2:.0f} s from now, 2 s into the latency run", flush=True)
    path = os.path.join(d, "env.txt")
    with open(path, "w") as f:
        run(os.path.join(REL, "examples", "bench_envelopes"), SECRET, DEVICE, str(count),
            str(int(time.time())), f"1a7e{os.getpid() & 0xffff:04x}", stdout=f)
    lines_in = open(path).read().splitlines()
    before = len(access_lines(access))
    pub = subprocess.Popen(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(ports["fwd"]), *dev,
                            "-t", f"device/{DEVICE}/data", "-q", "1", "-l"],
                           stdin=subprocess.PIPE, text=True)
    procs.append(pub)
    time.sleep(1.0)  # TLS handshake and CONNECT before the first timed line
    if start_at:
        time.sleep(max(0.0, start_at - time.time()))
    sent = []
    t0, steal0 = time.time(), steal_seconds()
    for i, line in enumerate(lines_in):
        delay = t0 + i / rate - time.time()
        if delay > 0:
            time.sleep(delay)
        sent.append(time.time())
        pub.stdin.write(line + "\n")
        pub.stdin.flush()
    pub.stdin.close()
    pub.wait(TIMEOUT)
    deadline = time.time() + TIMEOUT
    while len(access_lines(access)) < before + count and time.time() < deadline:
        time.sleep(0.05)
    got = access_lines(access)[before:before + count]
    # $msec is truncated to the millisecond: adding 1 ms makes each figure an upper bound.
    samples = [(float(g) + 0.001 - s, s) for g, s in zip(got, sent)]
    lat = sorted(w for w, _ in samples)
    if burst:
        worst = sorted(samples, reverse=True)[:3]
        print("slowest: " + ", ".join(f"{w * 1000:.1f} ms sent {s - start_at - 2:+.3f} s from the "
                                      "expiry" for w, s in worst), flush=True)
    if count == 0:
        print("latency: not measured (LAT_MESSAGES=0)", flush=True)
    elif len(got) == count:
        q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000
        print(f"latency publish -> backend at {rate} msg/s, {count} messages (QoS 1), upper bounds: "
              f"p50 <= {q(0.50):.2f} ms, p99 <= {q(0.99):.2f} ms, max <= {lat[-1]*1000:.2f} ms; "
              f"the host took {(steal_seconds() - steal0) * 1000:.0f} ms of CPU time (steal) meanwhile",
              flush=True)
    else:
        print(f"latency: only {len(got)} of {count} reached the backend", flush=True)

    if not rows:
        return
    print("\nmedians over rounds:")
    print("| | plain | validating | ratio | forwarding (pub->sub) | ratio | backend rate | CPU µs/msg plain / valid / fwd |")
    print("|---|---|---|---|---|---|---|---|")
    for qos in (0, 1):
        rs = [row[2] for row in rows if row[1] == qos]
        med = lambda f: statistics.median(f(x) for x in rs)
        print(f"| QoS {qos} | {med(lambda x: x['plain'][0]):.0f} | {med(lambda x: x['valid'][0]):.0f} "
              f"| **{med(lambda x: x['valid'][0]/x['plain'][0]):.2f}x** | {med(lambda x: x['fwd'][0]):.0f} "
              f"| **{med(lambda x: x['fwd'][0]/x['plain'][0]):.2f}x** | {med(lambda x: x['fwd'][3] or 0):.0f} "
              f"| {med(lambda x: x['plain'][2]):.1f} / {med(lambda x: x['valid'][2]):.1f} / {med(lambda x: x['fwd'][2]):.1f} |")
    if base_so:
        for qos in (0, 1):
            rs = [row[2] for row in rows if row[1] == qos]
            print(f"base build ({base_so}) validating, QoS {qos}: median ratio "
                  f"{statistics.median(x['base'][0]/x['plain'][0] for x in rs):.2f}x, CPU "
                  f"{statistics.median(x['base'][2] for x in rs):.1f} µs/msg")
    if drains:
        # Against the steady state: the fastest forwarding rate at the backend (QoS 0 or 1).
        steady = max((statistics.median(row[2]["fwd"][3] or 0 for row in rows if row[1] == q)
                      for q in (0, 1)), default=0) if rows else 0
        print(f"backlog drain: median {statistics.median(drains):.0f} msg/s "
              f"(min {min(drains):.0f}, max {max(drains):.0f}) over {len(drains)} rounds"
              + (f"; {statistics.median(drains) / steady:.2f}x the steady forwarding rate at the "
                 f"backend ({steady:.0f} msg/s)" if steady else ""))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    main()
