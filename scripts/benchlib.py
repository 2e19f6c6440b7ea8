"""What bench.py and bench-cluster.py share: ports, /proc CPU readings, nginx as the backend,
and the TLS part of an `iotgw init` mosquitto.conf. Python stdlib only."""
import os
import socket
import subprocess

TCK = os.sysconf("SC_CLK_TCK")
TLS_KEYS = ("cafile", "certfile", "keyfile", "require_certificate", "use_identity_as_username")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def run(*args, **kw):
    return subprocess.run(args, check=True, **kw)


def stat_cpu(raw):
    """utime+stime seconds from the text of a /proc/.../stat file."""
    fields = raw.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TCK


def proc_cpu(pid, tid=None):
    """CPU seconds of the process (every thread) or of one thread."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        return stat_cpu(f.read())


def steal_seconds():
    """CPU time the host took from this VM (all CPUs), from /proc/stat's steal column."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) / TCK if len(fields) > 8 else 0.0


def thread_cpus(pid):
    """CPU seconds of each thread of a process, summed by thread name (comm)."""
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/comm") as f:
                comm = f.read().strip()
            out[comm] = out.get(comm, 0.0) + proc_cpu(pid, int(t))
        except OSError:
            pass  # the thread ended between listing and reading
    return out


def exchange(sock, request):
    """Sends `request` (bytes) on a connected socket, reads until the peer closes, closes it."""
    with sock:
        sock.settimeout(5)
        sock.sendall(request)
        chunks = []
        while True:
            b = sock.recv(65536)
            if not b:
                break
            chunks.append(b)
    return b"".join(chunks)


def access_lines(path):
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def split_conf(gw):
    """The `iotgw init` mosquitto.conf of `gw` as (TLS listener lines, the rest without the
    plugin, listener, ACL and log-type lines), so each benchmark broker adds its own."""
    base = open(f"{gw}/mosquitto.conf").read().splitlines()
    tls = [l for l in base if l.startswith(TLS_KEYS)]
    common = [l for l in base if not l.startswith(("plugin", "listener", "acl_file", "log_type") + TLS_KEYS)]
    return tls, common


def write_nginx_conf(d, port, log_format, connections):
    """nginx from Debian as the backend: a loopback-only, non-daemon child with its own config in
    `d`, answering 200 to everything, logging `log_format` to d/access.log. Returns
    (config path, access log path)."""
    access = os.path.join(d, "access.log")
    ngconf = os.path.join(d, "nginx.conf")
    with open(ngconf, "w") as f:
        f.write(f"""daemon off; master_process off; worker_processes 1;
pid {d}/nginx.pid; error_log {d}/nginx-error.log;
events {{ worker_connections {connections}; }}
http {{
  client_body_temp_path {d}/ngx-body; proxy_temp_path {d}/ngx-proxy;
  fastcgi_temp_path {d}/ngx-fcgi; uwsgi_temp_path {d}/ngx-uwsgi; scgi_temp_path {d}/ngx-scgi;
  log_format t '{log_format}'; access_log {access} t buffer=64k flush=100ms;
  keepalive_requests 100000000; keepalive_timeout 60s;
  server {{ listen 127.0.0.1:{port}; location / {{ return 200 '{{"ok":true}}'; }} }}
}}
""")
    return ngconf, access
