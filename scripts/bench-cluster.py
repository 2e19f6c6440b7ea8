#!/usr/bin/env python3
"""Cluster benchmark (issue 11): 1, 2 and 3 nodes with the plugin behind HAProxy (TCP, TLS
passthrough), sharing the registry in PostgreSQL and replay state in Redis, forwarding at QoS 1
to one nginx; plus plain Mosquitto (no plugin, direct) and one node without cluster mode
(SQLite registry, behind the same HAProxy) as reference lines. All from ONE run.

    ROUNDS=3 DEVICES=6 MESSAGES=10000 scripts/bench-cluster.py      (or: make bench-cluster)

MESSAGES is per device. Load: DEVICES `mosquitto_pub -l -q 1` processes started at once, each
with its own certificate and MESSAGES envelopes pre-signed by
examples/bench_envelopes.rs before the timed region, connecting through HAProxy (`balance
roundrobin`: the connections spread evenly over the nodes). Figures per configuration and round:
- accept rate: messages / (start -> every mosquitto_pub exited, i.e. every PUBACK received);
- backend rate: messages / (start -> nginx logged all of them; `$msec`), with duplicates and
  missing ids checked from nginx's log of X-Message-Id;
- per node: broker-thread CPU (/proc/PID/task/PID/stat utime+stime) and whole-process CPU
  (/proc/PID/stat, every thread: workers, cluster publisher/subscriber, claims, exporter) per
  message that node accepted (its iotgw_messages_accepted_total);
- per node, by thread name: forwarding workers (iotgw-fwd-*: claim + POST) and the cluster
  publisher per message accepted, the cluster subscriber per id received from the other nodes;
- Redis and HAProxy process CPU per message (cluster-wide);
- replication delay p50/p99: the nodes' iotgw_cluster_replication_delay_seconds buckets summed,
  reported as the upper bound of the bucket that holds the quantile;
- Redis memory per claimed id: DBSIZE, INFO used_memory delta against the same Redis emptied
  (FLUSHALL) before the nodes started, and the mean MEMORY USAGE of 100 sampled claim keys.
Every configuration gets fresh nodes, a fresh HAProxy and an emptied Redis in each round; the
configurations alternate within a round so background load hits them alike. Loopback only,
every wait bounded (BENCH_TIMEOUT, default 120 s), every process started is stopped at exit.
"""
import collections
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (  # noqa: E402
    access_lines, exchange, free_port, proc_cpu, run, split_conf, stat_cpu, write_nginx_conf)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
DEVICES = int(os.environ.get("DEVICES", "6"))
M = int(os.environ.get("MESSAGES", "10000"))
NODE_COUNTS = [int(x) for x in os.environ.get("NODES", "1,2,3").split(",")]
TIMEOUT = float(os.environ.get("BENCH_TIMEOUT", "120"))
REL = os.path.join(ROOT, "target", "release")
TOTAL = DEVICES * M
DEVS = [f"bench_c{i:02d}" for i in range(DEVICES)]
SECRETS = {d: f"bench-cluster-secret-{i:02d}-0123456789" for i, d in enumerate(DEVS)}
REPL_METRIC = "iotgw_cluster_replication_delay_seconds"

procs = []  # (Popen, stop signal), stopped in reverse order at exit


def start(args, log, sig=signal.SIGTERM, stdin=None):
    p = subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                         stdin=stdin if stdin is not None else subprocess.DEVNULL)
    procs.append((p, sig))
    return p


def stop(p, sig=signal.SIGTERM):
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def stop_all():
    while procs:
        p, sig = procs.pop()
        stop(p, sig)


def wait_until(what, cond, timeout, log=None, proc=None):
    deadline = time.time() + timeout
    while True:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            sys.exit(f"{what}: process exited; log:\n{open(log).read() if log else ''}")
        if time.time() > deadline:
            sys.exit(f"{what}: not within {timeout} s" + (f"; log:\n{open(log).read()}" if log else ""))
        time.sleep(0.02)


def port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def http_get(port, path):
    """(status, body) or (0, error)."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        raw = exchange(s, f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        head, _, body = raw.decode(errors="replace").partition("\r\n\r\n")
        return int(head.split(" ")[1]), body
    except (OSError, ValueError, IndexError) as e:
        return 0, str(e)


def metrics(port):
    code, body = http_get(port, "/metrics")
    if code != 200:
        sys.exit(f"/metrics on {port}: {code} {body}")
    out = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            out[k] = float(v)
    return out


def thread_groups(pid):
    """CPU seconds per thread group of a broker: the broker thread, the forwarding workers
    (claims + HTTP), the cluster publisher and subscriber, and the rest (clock, exporter, ...)."""
    out = collections.defaultdict(float)
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1:raw.rindex(")")]
        cpu = stat_cpu(raw)
        if int(tid) == pid:
            g = "broker"
        elif comm.startswith("iotgw-fwd"):
            g = "fwd"
        elif comm.startswith("iotgw-cluster-p"):
            g = "pub"
        elif comm.startswith("iotgw-cluster-s"):
            g = "sub"
        else:
            g = "other"
        out[g] += cpu
    return out


class Redis:
    """A few RESP2 commands on one connection."""

    def __init__(self, port):
        self.port = port

    def cmd(self, *args):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        s.settimeout(10)
        req = f"*{len(args)}\r\n".encode()
        for a in args:
            a = str(a).encode()
            req += b"$%d\r\n%s\r\n" % (len(a), a)
        s.sendall(req)
        f = s.makefile("rb")
        try:
            return self._reply(f)
        finally:
            f.close()
            s.close()

    def _reply(self, f):
        line = f.readline().rstrip(b"\r\n")
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            return f.read(n + 2)[:-2].decode(errors="replace")
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply(f) for _ in range(n)]
        raise RuntimeError(f"bad RESP line {line!r}")

    def info(self, section, field):
        for l in self.cmd("INFO", section).splitlines():
            if l.startswith(field + ":"):
                return l.split(":", 1)[1]
        return None


def quantile_bound(buckets, q):
    """buckets: [(le, cumulative)] sorted, last le = inf. The upper bound holding quantile q."""
    total = buckets[-1][1]
    if total == 0:
        return None
    for le, n in buckets:
        if n >= q * total:
            return le
    return float("inf")


def fmt_bound(le):
    if le is None:
        return "-"
    if le == float("inf"):
        return "> 1 s"
    return f"≤ {le*1e6:.0f} µs" if le < 0.001 else f"≤ {le*1e3:g} ms"


def main():
    for tool in ("mosquitto", "mosquitto_pub", "nginx", "haproxy", "redis-server", "openssl", "setpriv"):
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            sys.exit(f"{tool} not found (make deps; nginx: apt-get install nginx-light)")
    pgbins = sorted((int(v), f"/usr/lib/postgresql/{v}/bin") for v in os.listdir("/usr/lib/postgresql")
                    if v.isdigit() and os.path.exists(f"/usr/lib/postgresql/{v}/bin/initdb")) \
        if os.path.isdir("/usr/lib/postgresql") else []
    if not pgbins:
        sys.exit("no /usr/lib/postgresql/*/bin/initdb (make deps installs postgresql)")
    run("cargo", "build", "-q", "--release", cwd=ROOT)
    run("cargo", "build", "-q", "--release", "--example", "bench_envelopes", cwd=ROOT)
    d = tempfile.mkdtemp(prefix="iotgw-bench-cluster.")
    os.chmod(d, 0o755)
    try:
        bench(d, pgbins[-1][1])
    finally:
        stop_all()
        shutil.rmtree(d, ignore_errors=True)


def start_postgres(d, pgbin):
    """initdb + postgres as `nobody` (via setpriv) when root, trust auth, loopback, fsync off."""
    pgdir = os.path.join(d, "pg")
    os.mkdir(pgdir)
    wrap = []
    if os.geteuid() == 0:
        uid = int(subprocess.check_output(["id", "-u", "nobody"]))
        gid = int(subprocess.check_output(["id", "-g", "nobody"]))
        os.chown(pgdir, uid, gid)
        wrap = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
    data = os.path.join(pgdir, "data")
    run(*wrap, f"{pgbin}/initdb", "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync", "-D",
        data, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port = free_port()
    with open(os.path.join(data, "postgresql.conf"), "a") as f:
        f.write(f"\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{pgdir}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 40\n")
    log = os.path.join(d, "pg.log")
    # SIGINT: a fast shutdown (SIGTERM would wait for every connected client).
    p = start([*wrap, f"{pgbin}/postgres", "-D", data], log, sig=signal.SIGINT)
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def ready():
        return subprocess.run(["psql", url, "-qAtc", "SELECT 1"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL).returncode == 0
    wait_until("postgres ready", ready, 20, log, p)
    return url


def bench(d, pgbin):
    gw = os.path.join(d, "gw")
    plugin = os.path.join(REL, "libsecure_iot_gateway.so")
    iotgw = os.path.join(REL, "iotgw")
    pg_url = start_postgres(d, pgbin)

    redis_port = free_port()
    redis_log = os.path.join(d, "redis.log")
    redis_p = start(["redis-server", "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "",
                     "--appendonly", "no", "--daemonize", "no", "--logfile", "", "--dir", d], redis_log)
    rds = Redis(redis_port)

    def redis_up():
        try:
            return rds.cmd("PING") == "PONG"
        except OSError:
            return False
    wait_until("redis-server answers PING", redis_up, 10, redis_log, redis_p)
    redis_url = f"redis://127.0.0.1:{redis_port}/"

    run(iotgw, "init", gw, "--port", "1", "--bind", "127.0.0.1", "--plugin", plugin,
        "--backend-url", "http://127.0.0.1:1/x", stdout=subprocess.DEVNULL)
    run(iotgw, "registry", "init", "--registry-url", pg_url, stdout=subprocess.DEVNULL)
    for dev in DEVS:
        # Once into the SQLite registry (the non-cluster node), once into PostgreSQL; each issues
        # a certificate from the same CA for the same CN, so the last one on disk is valid for both.
        run(iotgw, "device", "add", dev, "--dir", gw, "--secret", SECRETS[dev], stdout=subprocess.DEVNULL)
        run(iotgw, "device", "add", dev, "--dir", gw, "--registry-url", pg_url, "--secret", SECRETS[dev],
            stdout=subprocess.DEVNULL)

    tls, common = split_conf(gw)
    common += ["log_type error", "log_type warning", "log_type notice", "user root"]
    with open(f"{gw}/acl.plain", "w") as f:
        f.write(open(f"{gw}/acl").read() + "".join(f"\nuser {x}\ntopic write device/{x}/data\n" for x in DEVS))

    # nginx: 200 to every POST; logs the request's end time, URI and X-Message-Id.
    ng_port = free_port()
    ngconf, access = write_nginx_conf(d, ng_port, "$msec $uri $http_x_message_id", 512)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    ng = start([nginx, "-c", ngconf, "-p", d], os.path.join(d, "nginx.out"))
    wait_until("nginx listening", lambda: port_open(ng_port), 10, os.path.join(d, "nginx-error.log"), ng)
    backend = f"http://127.0.0.1:{ng_port}/device/{{device_id}}/data"

    run_no = [0]

    def start_nodes(n, kind):
        """kind: plain | single (SQLite, no cluster) | cluster. Returns a list of node dicts."""
        nodes = []
        for i in range(n):
            run_no[0] += 1
            tag = f"r{run_no[0]}-{kind}-n{i}"
            port, mport = free_port(), free_port()
            lines = list(common)
            if kind == "plain":
                lines += [f"acl_file {gw}/acl.plain"]
            else:
                lines += [f"acl_file {gw}/acl", f"plugin {plugin}", f"plugin_opt_backend_url {backend}",
                          f"plugin_opt_spool_path {d}/{tag}-outbox",
                          f"plugin_opt_metrics_listen 127.0.0.1:{mport}",
                          "plugin_opt_service_identities dashboard",
                          # Per device; every round's ids stay inside the window: room for all.
                          "plugin_opt_replay_cache_size 1000000",
                          "plugin_opt_spool_max_bytes 8589934592"]
                if kind == "single":
                    lines += [f"plugin_opt_db_path {gw}/devices.db"]
                else:
                    lines += [f"plugin_opt_registry_url {pg_url}", f"plugin_opt_cluster_url {redis_url}",
                              f"plugin_opt_node_id node-{i}"]
            lines += [f"listener {port} 127.0.0.1"] + tls
            conf = os.path.join(d, f"{tag}.conf")
            with open(conf, "w") as f:
                f.write("\n".join(lines) + "\n")
            log = os.path.join(d, f"{tag}.log")
            p = start(["mosquitto", "-c", conf], log)
            nodes.append({"i": i, "p": p, "port": port, "mport": mport, "log": log, "tag": tag})
        for nd in nodes:
            wait_until(f"{nd['tag']} listening", lambda: port_open(nd["port"]), 20, nd["log"], nd["p"])
            if kind != "plain":
                wait_until(f"{nd['tag']} /readyz 200", lambda: http_get(nd["mport"], "/readyz")[0] == 200,
                           20, nd["log"], nd["p"])
        time.sleep(0.3)  # the broker has logged the readiness probe's connection (TLS EOF)
        return nodes

    def start_haproxy(nodes):
        hdir = os.path.join(d, f"haproxy-{run_no[0]}")
        os.mkdir(hdir)
        sock = os.path.join(hdir, "admin.sock")
        fport = free_port()
        conf = f"""global
    stats socket {sock} mode 600 level admin
    log stderr format raw local0 info
defaults
    mode tcp
    log global
    option tcplog
    timeout connect 2s
    timeout client 10m
    timeout server 10m
    timeout check 1s
frontend mqtts
    bind 127.0.0.1:{fport}
    default_backend brokers
backend brokers
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
""" + "".join(f"    server n{nd['i']} 127.0.0.1:{nd['port']} check port {nd['mport']} inter 500ms fall 2 rise 1\n"
              for nd in nodes)
        cpath = os.path.join(hdir, "haproxy.cfg")
        with open(cpath, "w") as f:
            f.write(conf)
        log = os.path.join(hdir, "haproxy.log")
        p = start(["haproxy", "-db", "-f", cpath], log)

        def admin(command):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(5)
            s.connect(sock)
            return exchange(s, command.encode() + b"\n").decode()

        def all_up():
            try:
                csv = admin("show stat").splitlines()
            except OSError:
                return False
            head = csv[0].lstrip("# ").split(",")
            px, sv, st = head.index("pxname"), head.index("svname"), head.index("status")
            sts = [f[st] for f in (l.split(",") for l in csv[1:]) if len(f) > st and f[px] == "brokers"
                   and f[sv] != "BACKEND"]
            return len(sts) == len(nodes) and all(s == "UP" for s in sts)
        wait_until("every server UP in haproxy", all_up, 20, log, p)
        return p, fport

    def stop_run(nodes, hap):
        for x in ([hap] if hap else []) + [nd["p"] for nd in nodes]:
            for k, (p, sig) in enumerate(procs):
                if p is x:
                    procs.pop(k)
                    stop(p, sig)
                    break

    dev_args = {x: ["--cafile", f"{gw}/ca.pem", "--cert", f"{gw}/devices/{x}.pem", "--key",
                    f"{gw}/devices/{x}.key"] for x in DEVS}

    def one(r, ci, kind, n):
        """One timed run of configuration number ci; returns a dict of figures."""
        prefix = f"{r:02x}{ci:02x}{os.getpid() & 0xffff:04x}"
        ts = str(int(time.time()))
        paths = {}
        for x in DEVS:
            paths[x] = os.path.join(d, f"env-{x}.txt")
            with open(paths[x], "w") as f:
                run(os.path.join(REL, "examples", "bench_envelopes"), SECRETS[x], x, str(M), ts,
                    prefix, stdout=f)
        cluster = kind == "cluster"
        if cluster:
            rds.cmd("FLUSHALL", "SYNC")
        nodes = start_nodes(n, kind)
        hap, port = None, nodes[0]["port"]
        if kind != "plain":
            hap, port = start_haproxy(nodes)
        if cluster:
            wait_until("every node subscribed to iotgw:ids",
                       lambda: rds.cmd("PUBSUB", "NUMSUB", "iotgw:ids")[1] == n, 10)
            time.sleep(0.3)
            mem0, keys0 = int(rds.info("memory", "used_memory")), rds.cmd("DBSIZE")
        m0 = [metrics(nd["mport"]) for nd in nodes] if kind != "plain" else None
        cpu0 = [(proc_cpu(nd["p"].pid, nd["p"].pid), proc_cpu(nd["p"].pid)) for nd in nodes]
        grp0 = [thread_groups(nd["p"].pid) for nd in nodes]
        rcpu0 = proc_cpu(redis_p.pid)
        hcpu0 = proc_cpu(hap.pid) if hap else 0
        ncpu0 = proc_cpu(ng.pid)
        before = len(access_lines(access))
        # Broker log lines from here on are the run's (earlier: start-up, the readiness probe).
        log_at = {nd["tag"]: os.path.getsize(nd["log"]) for nd in nodes}
        pubs = []
        t0 = time.time()
        for x in DEVS:
            log = os.path.join(d, f"pub-{x}.log")
            p = start(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), *dev_args[x], "-i", x,
                       "-t", f"device/{x}/data", "-q", "1", "-l"], log, stdin=open(paths[x]))
            pubs.append((x, p, log))
        deadline = t0 + TIMEOUT
        while any(p.poll() is None for _, p, _ in pubs) and time.time() < deadline:
            time.sleep(0.005)
        t_pub = time.time()
        failed = []
        for x, p, log in pubs:
            if p.poll() is None:
                failed.append(f"{x}: still running after {TIMEOUT} s")
            elif p.returncode != 0:
                failed.append(f"{x}: exit {p.returncode}: {open(log).read().strip()[-500:]}")
            for k, (q, sig) in enumerate(procs):
                if q is p:
                    procs.pop(k)
                    stop(q, sig)
                    break
        res = {"accept": TOTAL / (t_pub - t0), "failed": failed, "kind": kind, "n": n}
        if kind != "plain":
            deadline = time.time() + TIMEOUT
            while len(access_lines(access)) < before + TOTAL and time.time() < deadline:
                time.sleep(0.05)
            # Settled: the metrics show every acceptance and every outbox is empty.
            def settled():
                ms = [metrics(nd["mport"]) for nd in nodes]
                return (sum(x.get("iotgw_messages_accepted_total", 0) for x in ms)
                        - sum(x.get("iotgw_messages_accepted_total", 0) for x in m0) >= TOTAL - len(failed) * M
                        and sum(x.get("iotgw_outbox_pending_messages", 0) for x in ms) == 0)
            deadline = time.time() + 10
            while not settled() and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)  # a late duplicate would show up in nginx's log by now (flush=100ms)
            lines = access_lines(access)[before:]
            # (URI, X-Message-Id): the ids repeat across devices, the URI names the device.
            ids = collections.Counter(tuple(l.split(" ", 2)[1:]) for l in lines if l.count(" ") >= 2)
            res["delivered"] = len(lines)
            res["dups"] = sum(c - 1 for c in ids.values() if c > 1)
            res["dup_ids"] = [k for k, c in ids.items() if c > 1][:5]
            res["missing"] = TOTAL - len(ids)
            if len(lines) >= TOTAL:
                last = max(float(l.split(" ", 1)[0]) for l in lines[:TOTAL])
                res["backend"] = TOTAL / (last - t0)
            else:
                res["backend"] = None
            m1 = [metrics(nd["mport"]) for nd in nodes]
        cpu1 = [(proc_cpu(nd["p"].pid, nd["p"].pid), proc_cpu(nd["p"].pid)) for nd in nodes]
        grp1 = [thread_groups(nd["p"].pid) for nd in nodes]
        res["redis_us"] = (proc_cpu(redis_p.pid) - rcpu0) * 1e6 / TOTAL
        res["haproxy_us"] = (proc_cpu(hap.pid) - hcpu0) * 1e6 / TOTAL if hap else None
        res["nginx_us"] = (proc_cpu(ng.pid) - ncpu0) * 1e6 / TOTAL
        per = []
        for k, nd in enumerate(nodes):
            g = (lambda key: m1[k].get(key, 0) - m0[k].get(key, 0)) if kind != "plain" else (lambda key: 0)
            acc = g("iotgw_messages_accepted_total") if kind != "plain" else TOTAL
            rej = {key: v - m0[k].get(key, 0) for key, v in m1[k].items()
                   if key.startswith("iotgw_messages_rejected_total") and v - m0[k].get(key, 0)} \
                if kind != "plain" else {}
            per.append({
                "accepted": acc,
                "thread_s": cpu1[k][0] - cpu0[k][0],
                "proc_s": cpu1[k][1] - cpu0[k][1],
                "received": g("iotgw_cluster_ids_received_total"),
                "published": g("iotgw_cluster_ids_published_total"),
                "claims": g("iotgw_cluster_claims_total"),
                "claim_errors": g("iotgw_cluster_claim_errors_total"),
                "ids_dropped": g("iotgw_cluster_ids_dropped_total"),
                "malformed": g("iotgw_cluster_malformed_received_total"),
                "replays": g('iotgw_cluster_replays_total{content="same"}')
                + g('iotgw_cluster_replays_total{content="different"}'),
                "rejected": rej,
                "groups": {key: grp1[k][key] - grp0[k].get(key, 0) for key in grp1[k]},
            })
        res["nodes"] = per
        acc_sum = sum(x["accepted"] for x in per)
        res["accepted_sum"] = acc_sum
        res["thread_us"] = sum(x["thread_s"] for x in per) * 1e6 / max(acc_sum, 1)
        res["proc_us"] = sum(x["proc_s"] for x in per) * 1e6 / max(acc_sum, 1)
        grp = lambda key: sum(x["groups"].get(key, 0) for x in per)
        res["fwd_us"] = grp("fwd") * 1e6 / max(acc_sum, 1)
        res["pub_us"] = grp("pub") * 1e6 / max(acc_sum, 1)
        res["other_us"] = grp("other") * 1e6 / max(acc_sum, 1)
        rec = sum(x["received"] for x in per)
        res["sub_us_per_received"] = grp("sub") * 1e6 / rec if rec else None
        res["sub_s"] = grp("sub")
        if cluster:
            buckets = collections.defaultdict(float)
            for k in range(n):
                for key, v in m1[k].items():
                    mm = re.match(REPL_METRIC + r'_bucket\{le="([^"]+)"\}$', key)
                    if mm:
                        buckets[float(mm.group(1))] += v - m0[k].get(key, 0)
            bl = sorted(buckets.items())
            res["repl_count"] = bl[-1][1] if bl else 0
            res["repl_p50"] = quantile_bound(bl, 0.5) if bl else None
            res["repl_p99"] = quantile_bound(bl, 0.99) if bl else None
            res["repl_buckets"] = bl
            keys = rds.cmd("DBSIZE") - keys0
            mem = int(rds.info("memory", "used_memory")) - mem0
            sample, cur = [], "0"
            while len(sample) < 100:
                cur, batch = rds.cmd("SCAN", cur, "MATCH", "iotgw:claim:*", "COUNT", "1000")
                sample += batch
                if cur == "0":
                    break
            sample = sample[:100]
            usage = [rds.cmd("MEMORY", "USAGE", k, "SAMPLES", "0") for k in sample]
            res["dbsize"] = keys
            res["mem_per_id"] = mem / keys if keys else None
            res["usage_per_key"] = statistics.mean(usage) if usage else None
            if sample:
                res["key_example"] = (sample[0], rds.cmd("GET", sample[0]), rds.cmd("PTTL", sample[0]))
        stop_run(nodes, hap)
        odd = []
        for nd in nodes:
            with open(nd["log"], errors="replace") as f:
                f.seek(log_at[nd["tag"]])
                for l in f:
                    low = l.lower()
                    if "error" in low or "warn" in low or "fail" in low or "refus" in low or "drop" in low:
                        odd.append(f"{nd['tag']}: {l.rstrip()}")
        res["odd_log"] = odd
        return res

    configs = [("plain", "plain", 1), ("single", "single", 1)] + \
        [(f"cluster-{n}", "cluster", n) for n in NODE_COUNTS]
    print(f"bench-cluster: {ROUNDS} rounds; {DEVICES} devices x {M} envelopes (~237 bytes, QoS 1, "
          f"mutual TLS, all publishers at once) = {TOTAL} messages per run; loopback, "
          f"{os.cpu_count()} cores shared by everything (nodes, HAProxy, Redis, PostgreSQL, nginx, "
          f"publishers). plain = Mosquitto without the plugin, direct; single = one node with the "
          f"plugin, SQLite registry, no cluster mode, behind HAProxy; cluster-N = N nodes behind "
          f"HAProxy. Rates in msg/s; CPU in µs per message accepted.", flush=True)
    results = collections.defaultdict(list)
    for r in range(ROUNDS):
        for ci, (label, kind, n) in enumerate(configs):
            res = one(r, ci, kind, n)
            results[label].append(res)
            s = f"round {r+1} {label:9s}: accept {res['accept']:7.0f}"
            if kind != "plain":
                s += f" | backend {res['backend'] or 0:7.0f}"
            s += f" | broker thread {res['thread_us']:5.1f} µs, process {res['proc_us']:5.1f} µs"
            if n > 1 or kind == "cluster":
                s += " (per node: " + ", ".join(
                    f"{x['accepted']:.0f} acc {x['thread_s']*1e6/max(x['accepted'],1):.0f}/"
                    f"{x['proc_s']*1e6/max(x['accepted'],1):.0f}" for x in res["nodes"]) + ")"
            s += f" | redis {res['redis_us']:4.1f} µs" if kind == "cluster" else ""
            s += f" | haproxy {res['haproxy_us']:4.1f} µs" if res["haproxy_us"] is not None else ""
            if kind != "plain":
                s += (f" | threads: fwd {res['fwd_us']:.1f}, pub {res['pub_us']:.1f}, other "
                      f"{res['other_us']:.1f} µs/msg")
                if res["sub_us_per_received"] is not None:
                    s += f", sub {res['sub_us_per_received']:.1f} µs/received id"
                elif kind == "cluster":
                    s += f", sub {res['sub_s']*1e6/TOTAL:.1f} µs/msg (own batches only)"
            if kind == "cluster":
                s += (f" | repl p50 {fmt_bound(res['repl_p50'])}, p99 {fmt_bound(res['repl_p99'])} "
                      f"({res['repl_count']:.0f} ids received)")
                s += (f" | Redis {res['dbsize']} keys, used_memory {res['mem_per_id'] or 0:.0f} B/id, "
                      f"MEMORY USAGE {res['usage_per_key'] or 0:.0f} B/key")
            print(s, flush=True)
            problems = []
            if res["failed"]:
                problems.append(f"publishers failed: {res['failed']}")
            if kind != "plain":
                if res["accepted_sum"] != TOTAL:
                    problems.append(f"accepted {res['accepted_sum']:.0f} of {TOTAL}")
                if res["missing"] or res["dups"]:
                    problems.append(f"nginx: {res['delivered']} requests, {res['missing']} ids missing, "
                                    f"{res['dups']} duplicates {res['dup_ids']}")
                for k, x in enumerate(res["nodes"]):
                    bad = {key: x[key] for key in ("claim_errors", "ids_dropped", "malformed", "replays")
                           if x[key]}
                    if x["rejected"] or bad:
                        problems.append(f"node {k}: {x['rejected']} {bad}")
                    if kind == "cluster":
                        others = res["accepted_sum"] - x["accepted"]
                        if x["received"] != others or x["published"] != x["accepted"] \
                                or x["claims"] != x["accepted"]:
                            problems.append(f"node {k}: published {x['published']:.0f}, claims "
                                            f"{x['claims']:.0f}, accepted {x['accepted']:.0f}, received "
                                            f"{x['received']:.0f} of the others' {others:.0f}")
            if res["odd_log"]:
                problems.append("broker log:\n    " + "\n    ".join(res["odd_log"][:10])
                                + (f"\n    ... {len(res['odd_log'])} lines" if len(res["odd_log"]) > 10 else ""))
            if kind == "cluster" and n > 1 and res["repl_count"]:
                print("  replication delay, cumulative: " + ", ".join(
                    f"{fmt_bound(le)} {c*100/res['repl_count']:.1f}%" for le, c in res["repl_buckets"]),
                    flush=True)
            for pr in problems:
                print(f"  !! {pr}", flush=True)
            if kind == "cluster" and r == 0 and res.get("key_example"):
                k, v, ttl = res["key_example"]
                print(f"  (a claim key: {k} = {v!r}, PTTL {ttl} ms)", flush=True)

    med = lambda label, f: statistics.median(f(x) for x in results[label])
    print(f"\nmedians over {ROUNDS} rounds ({DEVICES} devices x {M} messages, QoS 1):")
    print("| | nodes | accept msg/s | backend msg/s | broker thread µs/msg | node process µs/msg "
          "| of which workers / cluster pub µs/msg, cluster sub µs/received id "
          "| Redis µs/msg | HAProxy µs/msg | replication p50 / p99 (bucket upper bounds) "
          "| Redis bytes per claimed id (used_memory / MEMORY USAGE) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, kind, n in configs:
        rs = results[label]
        row = [label, str(n), f"{med(label, lambda x: x['accept']):,.0f}"]
        row.append(f"{med(label, lambda x: x['backend'] or 0):,.0f}" if kind != "plain" else "–")
        row.append(f"{med(label, lambda x: x['thread_us']):.1f}")
        row.append(f"{med(label, lambda x: x['proc_us']):.1f}")
        if kind == "plain":
            row.append("–")
        else:
            t = f"{med(label, lambda x: x['fwd_us']):.1f} / "
            t += f"{med(label, lambda x: x['pub_us']):.1f}, " if kind == "cluster" else "–, "
            t += (f"{med(label, lambda x: x['sub_us_per_received']):.1f}" if kind == "cluster" and n > 1
                  else "–")
            row.append(t)
        row.append(f"{med(label, lambda x: x['redis_us']):.1f}" if kind == "cluster" else "–")
        row.append(f"{med(label, lambda x: x['haproxy_us']):.1f}" if kind != "plain" else "–")
        if kind == "cluster" and n > 1:
            p50 = sorted(x["repl_p50"] for x in rs)[len(rs) // 2]
            p99 = sorted(x["repl_p99"] for x in rs)[len(rs) // 2]
            row.append(f"{fmt_bound(p50)} / {fmt_bound(p99)}")
        else:
            row.append("–")
        if kind == "cluster":
            row.append(f"{med(label, lambda x: x['mem_per_id'] or 0):.0f} / "
                       f"{med(label, lambda x: x['usage_per_key'] or 0):.0f}")
        else:
            row.append("–")
        print("| " + " | ".join(row) + " |")

    # Projection: a node's CPU = a x (messages it accepts) + b x (ids it receives from the others).
    # a from cluster-1 (it receives none); b from the multi-node runs. For N nodes on N machines
    # at a cluster-wide rate R, each node accepts R/N and receives R(N-1)/N, so its broker thread
    # saturates at R = 1e6 / (a/N + b(N-1)/N); Redis (one thread, shared) at R = 1e6 / redis µs.
    if "cluster-1" in results and any(n > 1 for n in NODE_COUNTS):
        print("\nprojection (per-message costs from this run; N nodes each on its own machine):")
        a_t = med("cluster-1", lambda x: x["thread_us"])
        a_p = med("cluster-1", lambda x: x["proc_us"])
        for n in (k for k in NODE_COUNTS if k > 1):
            lab = f"cluster-{n}"

            def b_of(x, key, a):
                rec = sum(y["received"] for y in x["nodes"])
                return (sum(y[key] for y in x["nodes"]) * 1e6 - a * x["accepted_sum"]) / max(rec, 1)
            b_t = med(lab, lambda x: b_of(x, "thread_s", a_t))
            b_p = med(lab, lambda x: b_of(x, "proc_s", a_p))
            sub = med(lab, lambda x: x["sub_us_per_received"])
            print(f"  from {lab}: each id received from another node costs {b_t:.1f} µs of the broker "
                  f"thread and {b_p:.1f} µs of the node's process (regression against cluster-1's "
                  f"{a_t:.1f} / {a_p:.1f} µs per message accepted); measured directly, the "
                  f"subscriber thread spends {sub:.1f} µs per received id")
        redis_us = statistics.median(x["redis_us"] for lab in results if lab.startswith("cluster-")
                                     for x in results[lab])
        print(f"  Redis: {redis_us:.1f} µs of its one thread per message -> cluster-wide ceiling "
              f"~{1e6/redis_us:,.0f} msg/s")
        big = max(NODE_COUNTS)
        b_t = med(f"cluster-{big}", lambda x: b_of(x, "thread_s", a_t))
        b_p = med(f"cluster-{big}", lambda x: b_of(x, "proc_s", a_p))
        for n in sorted(set([1] + NODE_COUNTS)):
            rt = 1e6 / (a_t / n + b_t * (n - 1) / n)
            rp = 1e6 / (a_p / n + b_p * (n - 1) / n)
            print(f"  {n} node(s): broker thread saturates at ~{rt:,.0f} msg/s cluster-wide; the whole "
                  f"node process needs one core per ~{rp:,.0f} msg/s cluster-wide")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    main()
