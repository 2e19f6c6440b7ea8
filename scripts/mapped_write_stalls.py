#!/usr/bin/env python3
"""Does a write into a shared file mapping stall while another thread fdatasyncs the file?

The outbox's pattern (delivery/mapped.rs): 250-byte records copied into a 64 MiB mapped
segment at 1,000/s, disk reserved 4 MiB at a time with fallocate, fdatasync every second from
another thread. Prints the time of each record copy (page faults included) and any fdatasync
over 50 ms. Run it while something loads the disk (e.g. a CI run):

    scripts/mapped_write_stalls.py [SECONDS] [DIR]      (defaults: 30, a temp dir under DIR=.)
"""
import mmap, os, sys, tempfile, threading, time
tmp = tempfile.TemporaryDirectory(dir=sys.argv[2] if len(sys.argv) > 2 else ".")
path = os.path.join(tmp.name, "seg")
size = 64 << 20
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
os.posix_fallocate(fd, 0, 4 << 20)
os.ftruncate(fd, size)
m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
stop = False
def syncer():
    while not stop:
        time.sleep(1)
        t = time.perf_counter(); os.fdatasync(fd); d = time.perf_counter() - t
        if d > 0.05: print(f"  fdatasync {d*1000:.1f} ms", flush=True)
th = threading.Thread(target=syncer); th.start()
rec = b"x" * 250
off = 0; reserved = 4 << 20
lat = []
dur = float(sys.argv[1]) if len(sys.argv) > 1 else 30
end = time.time() + dur
nxt = time.perf_counter()
while time.time() < end:
    if off + 250 > reserved:
        t = time.perf_counter(); os.posix_fallocate(fd, reserved, 4 << 20); d = time.perf_counter() - t
        lat.append(("fallocate", d)); reserved += 4 << 20
    t = time.perf_counter()
    m[off:off+250] = rec
    d = time.perf_counter() - t
    lat.append(("write", d)); off += 250
    nxt += 0.001
    s = nxt - time.perf_counter()
    if s > 0: time.sleep(s)
stop = True; th.join()
ws = sorted(d for k, d in lat if k == "write")
print(f"records {len(ws)}: p50 {ws[len(ws)//2]*1e6:.1f} us, p99 {ws[int(len(ws)*0.99)]*1e6:.1f} us, p999 {ws[int(len(ws)*0.999)]*1e6:.1f} us, max {ws[-1]*1e3:.2f} ms; >5 ms: {sum(1 for d in ws if d > 0.005)}")
fa = [d for k, d in lat if k == "fallocate"]
if fa: print(f"fallocate x{len(fa)} max {max(fa)*1e3:.2f} ms")
