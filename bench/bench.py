#!/usr/bin/env python3
"""longwire benchmark suite.

Runs the same fio workloads against longwire and its peers (nbdkit,
qemu-nbd, nbd-server) on the same 1 GiB image, interleaved (A, B, C, A, B,
C, ...) with several repetitions, and writes the medians to
docs/BENCHMARKS.md. Each run starts a fresh server, so peak RSS is per
workload; server CPU time comes from /proc (the whole process tree, so
forking servers are counted fully).

The "stores" workloads run the same fio jobs against longwire itself with
each store behind the export (file, sqlite, memory, and s3 when
LONGWIRE_BENCH_S3_URI names a volume URI; LONGWIRE_BENCH_S3_SETTINGS, if
set, describes it in the report instead of the URI), for the Stores table.

A run limited with --only or --servers keeps every other table from the
saved docs/BENCHMARKS.json, so `bench/run --only stores` refreshes one table.

Started by bench/run, which installs the tools and builds longwire.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONGWIRE = os.path.join(ROOT, "target", "release", "longwire")
IMAGE_SIZE = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- workloads

@dataclass
class Workload:
    name: str
    rw: str
    bs: str
    iodepth: int
    jobs: int = 1
    mix: int | None = None  # rwmixread percentage for randrw
    store: str = "file"  # file, memory, or stores (longwire's own stores)

    def fio_args(self):
        a = [f"--rw={self.rw}", f"--bs={self.bs}", f"--iodepth={self.iodepth}", f"--numjobs={self.jobs}"]
        if self.mix is not None:
            a.append(f"--rwmixread={self.mix}")
        return a


def file_workloads():
    base = [
        ("4k randread QD1", "randread", "4k", 1, None),
        ("4k randread QD32", "randread", "4k", 32, None),
        ("4k randwrite QD32", "randwrite", "4k", 32, None),
        ("64k randrw 70/30 QD16", "randrw", "64k", 16, 70),
        ("1M seqread QD8", "read", "1M", 8, None),
        ("1M seqwrite QD8", "write", "1M", 8, None),
    ]
    out = []
    for jobs in (1, 4):
        for name, rw, bs, qd, mix in base:
            label = f"{name} ×{jobs} conn" if jobs > 1 else name
            out.append(Workload(label, rw, bs, qd, jobs, mix))
    return out


def memory_workloads():
    return [
        Workload("memory 4k randread QD32", "randread", "4k", 32, store="memory"),
        Workload("memory 4k randwrite QD32", "randwrite", "4k", 32, store="memory"),
    ]


def store_workloads():
    """The same three jobs against every longwire store (the Stores table)."""
    return [
        Workload("stores 4k randwrite QD32", "randwrite", "4k", 32, store="stores"),
        Workload("stores 1M seqread QD8", "read", "1M", 8, store="stores"),
        Workload("stores 1M seqwrite QD8", "write", "1M", 8, store="stores"),
    ]


# ------------------------------------------------------------------ servers

@dataclass
class Server:
    name: str
    settings: str  # recorded in the report
    stores: tuple = ("file",)

    def argv(self, port, image, store, tmp):
        raise NotImplementedError

    def export(self):
        return ""

    def env(self):
        return None

    def daemon_pid(self, tmp):
        """PID of the serving process when it is not the one we started."""
        return None


class Longwire(Server):
    def argv(self, port, image, store, tmp):
        uri = f"file:{image}" if store == "file" else f"memory:?size={IMAGE_SIZE}"
        return [LONGWIRE, "serve", "--export", f"bench={uri}", "--listen", f"127.0.0.1:{port}"]

    def export(self):
        return "bench"

    def env(self):
        e = dict(os.environ)
        e["RUST_LOG"] = "warn"
        return e


class LongwireStore(Longwire):
    """longwire serving the benchmark volume from one of its stores. Every
    store starts with the same 1 GiB of random data: its own image
    (stores.img, apart from bench.img, which the other workloads overwrite),
    copied once into sqlite (stores.db, kept) and s3; memory is filled per
    run."""

    def __init__(self, kind, settings):
        super().__init__(f"store {kind}", settings, ("stores",))
        self.kind = kind
        self.prepared = False

    @staticmethod
    def image(shared_image):
        return os.path.join(os.path.dirname(shared_image), "stores.img")

    def uri(self, image):
        if self.kind == "file":
            return f"file:{image}"
        if self.kind == "sqlite":
            return f"sqlite:{os.path.join(os.path.dirname(image), 'stores.db')}?volume=bench"
        if self.kind == "memory":
            return f"memory:?size={IMAGE_SIZE}"
        return os.environ["LONGWIRE_BENCH_S3_URI"]

    def prepare(self, image):
        """Copy the image into a persistent store unless it is there already
        (sqlite: kept between runs in the image directory)."""
        make_image(image)
        if self.prepared or self.kind in ("file", "memory"):
            return
        uri = self.uri(image)
        have = subprocess.run([LONGWIRE, "info", uri], capture_output=True).returncode == 0
        if self.kind == "s3" or not have:
            print(f"filling {uri} from {image}", file=sys.stderr)
            if not have:
                subprocess.run([LONGWIRE, "create", uri, "--size", str(IMAGE_SIZE)], check=True,
                               stdout=subprocess.DEVNULL)
            subprocess.run([LONGWIRE, "copy", f"file:{image}", uri, "--no-progress"], check=True)
        self.prepared = True

    def argv(self, port, image, store, tmp):
        image = self.image(image)
        self.prepare(image)
        return [LONGWIRE, "serve", "--export", f"bench={self.uri(image)}", "--listen", f"127.0.0.1:{port}"]

    def needs_prefill(self):
        return self.kind == "memory"


class Nbdkit(Server):
    def __init__(self, name, settings, plugin):
        super().__init__(name, settings, ("file",) if plugin == "file" else ("memory",))
        self.plugin = plugin

    def argv(self, port, image, store, tmp):
        base = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "--threads", "16", "-e", "bench"]
        if self.plugin == "file":
            return base + ["file", image]
        return base + [self.plugin, f"size={IMAGE_SIZE}"]

    def export(self):
        return "bench"


class QemuNbd(Server):
    def argv(self, port, image, store, tmp):
        return ["qemu-nbd", "-f", "raw", "--cache=writeback", "--aio=threads", "--persistent",
                "--shared=8", "-b", "127.0.0.1", "-p", str(port), "-x", "bench", image]

    def export(self):
        return "bench"


class NbdServer(Server):
    def argv(self, port, image, store, tmp):
        conf = os.path.join(tmp, "nbd-server.conf")
        with open(conf, "w") as f:
            f.write(f"[generic]\nport = {port}\nlistenaddr = 127.0.0.1\nallowlist = true\n"
                    f"[bench]\nexportname = {image}\nflush = true\nfua = true\ntrim = true\n")
        # -d would serve a single connection; instead let it daemonize and
        # find it through its pid file.
        return ["nbd-server", "-C", conf, "-p", os.path.join(tmp, "nbd-server.pid")]

    def export(self):
        return "bench"

    def daemon_pid(self, tmp):
        path = os.path.join(tmp, "nbd-server.pid")
        for _ in range(100):
            try:
                with open(path) as f:
                    return int(f.read().strip())
            except (OSError, ValueError):
                time.sleep(0.05)
        raise RuntimeError("nbd-server wrote no pid file")


SERVERS = [
    Longwire("longwire", "file store, tokio runtime (2 workers), cached reads inline (RWF_NOWAIT), other file I/O on a 4-thread pool"),
    Nbdkit("nbdkit", "file plugin, --threads 16, page cache", "file"),
    QemuNbd("qemu-nbd", "--cache=writeback --aio=threads --shared=8"),
    NbdServer("nbd-server", "one process per client, flush/fua/trim on"),
    Longwire("longwire memory", "memory store", ("memory",)),
    Nbdkit("nbdkit memory", "memory plugin, --threads 16", "memory"),
    Nbdkit("nbdkit null", "null plugin (protocol ceiling), --threads 16", "null"),
]

STORE_SERVERS = [
    LongwireStore("file", "raw image on the local file system (page cache)"),
    LongwireStore("sqlite", "one SQLite database, 64 KiB chunks, no compression, WAL"),
    LongwireStore("memory", "sparse RAM, 64 KiB chunks"),
] + ([LongwireStore("s3", os.environ.get("LONGWIRE_BENCH_S3_SETTINGS")
                    or "LONGWIRE_BENCH_S3_URI: " + os.environ["LONGWIRE_BENCH_S3_URI"])]
     if os.environ.get("LONGWIRE_BENCH_S3_URI") else [])


# -------------------------------------------------------------------- iSCSI

@dataclass
class IscsiWorkload:
    name: str
    tool: str  # "qemu-img" or "iscsi-perf"
    bs: int
    depth: int
    write: bool = False
    count: int = 0  # qemu-img bench request count
    store: str = "iscsi"


def iscsi_workloads():
    return [
        IscsiWorkload("iSCSI 4k read QD32 (qemu-img bench)", "qemu-img", 4096, 32, count=150_000),
        IscsiWorkload("iSCSI 4k write QD32 (qemu-img bench)", "qemu-img", 4096, 32, True, count=150_000),
        IscsiWorkload("iSCSI 1M read QD8 (qemu-img bench)", "qemu-img", 1 << 20, 8, count=4_000),
        IscsiWorkload("iSCSI 1M write QD8 (qemu-img bench)", "qemu-img", 1 << 20, 8, True, count=4_000),
        IscsiWorkload("iSCSI 4k randread QD32 (iscsi-perf)", "iscsi-perf", 4096, 32),
    ]


class LongwireIscsi(Server):
    def argv(self, port, image, store, tmp):
        return [LONGWIRE, "serve", "--export", f"bench=file:{image}", "--iscsi", f"127.0.0.1:{port}"]

    def env(self):
        e = dict(os.environ)
        e["RUST_LOG"] = "warn"
        return e

    def url(self, port):
        return f"iscsi://127.0.0.1:{port}/iqn.2026-11.dev.longwire:bench/0"


class Tgt(Server):
    """tgtd in the foreground on a private portal and control port."""

    def argv(self, port, image, store, tmp):
        self.ctl = str(port % 1000 + 100)
        return ["tgtd", "-f", "-C", self.ctl, "--iscsi", f"portal=127.0.0.1:{port}"]

    def configure(self, image):
        adm = ["tgtadm", "-C", self.ctl, "--lld", "iscsi"]
        subprocess.run(adm + ["--op", "new", "--mode", "target", "--tid", "1", "-T", "iqn.2026-11.dev.bench:tgt"], check=True)
        subprocess.run(adm + ["--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", image], check=True)
        subprocess.run(adm + ["--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"], check=True)

    def url(self, port):
        return f"iscsi://127.0.0.1:{port}/iqn.2026-11.dev.bench:tgt/1"


ISCSI_SERVERS = [
    LongwireIscsi("longwire iSCSI", "file store, ImmediateData, CmdSN window 64", ("iscsi",)),
    Tgt("tgt", "tgtd 1.0.85, rdwr backing store, default I/O threads", ("iscsi",)),
]


def iscsi_tool(url, wl, runtime):
    if wl.tool == "qemu-img":
        cmd = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-c", str(wl.count), "-d", str(wl.depth), "-s", str(wl.bs)]
        if wl.write:
            # Not qemu-img's default zeros: they would turn the shared image
            # into one that is mostly zero runs, which NBD reads skip.
            cmd += ["-w", "--pattern", "0xa5"]
        out = subprocess.run(cmd + [url], check=True, capture_output=True, text=True).stdout
        secs = float(out.strip().splitlines()[-1].split()[3])
        iops = wl.count / secs
    else:
        p = subprocess.run(["timeout", str(runtime + 1), "iscsi-perf", "-r", "-m", str(wl.depth), "-b", str(wl.bs // 512), url],
                           capture_output=True, text=True)
        lines = [l for l in (p.stdout + p.stderr).replace("\r", "\n").splitlines() if "iops average" in l]
        if not lines:
            raise RuntimeError("iscsi-perf printed no statistics")
        iops = float(lines[-1].split("iops average")[1].split()[0])
        secs = runtime
    return {"iops": iops, "mbps": iops * wl.bs / 1e6, "bytes": iops * wl.bs * secs}


def run_iscsi_once(server, wl, image, tmp, runtime):
    port = free_port()
    proc = subprocess.Popen(server.argv(port, image, wl.store, tmp), env=server.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(port, proc)
        if isinstance(server, Tgt):
            server.configure(image)
        sampler = Sampler(proc.pid)
        sampler.start()
        cpu0 = cpu_seconds(tree(proc.pid))
        res = iscsi_tool(server.url(port), wl, runtime)
        cpu1 = cpu_seconds(tree(proc.pid))
        sampler.stop.set()
        sampler.join()
        gib = res["bytes"] / (1 << 30)
        res["cpu_per_gib"] = (cpu1 - cpu0) / gib if gib else float("nan")
        res["rss_mib"] = sampler.peak / (1 << 20)
        return res
    finally:
        # tgtd ignores SIGTERM while it has targets; this is a benchmark.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


# ------------------------------------------------------------ /proc probes

def tree(pid):
    """pid and all its live descendants."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        ppid = int(st[st.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rindex(")") + 2:].split()
        # utime, stime, cutime, cstime (fields 14-17 of stat)
        total += sum(int(x) for x in fields[11:15])
    return total / CLK_TCK


def rss_bytes(pids):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except OSError:
            pass
    return total


class Sampler(threading.Thread):
    """Samples the server tree's RSS until stopped; keeps the peak."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_bytes(tree(self.pid)))
            self.stop.wait(0.05)


# ------------------------------------------------------------------ running

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=20, daemonizes=False):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() not in (None, 0) or (proc.poll() == 0 and not daemonizes):
            raise RuntimeError(f"server exited early with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start listening")


def stop(proc, pid):
    """Stop the server's whole process group (daemons keep our session)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(os.getpgid(pid), sig)
        except ProcessLookupError:
            break
        deadline = time.time() + 10
        while time.time() < deadline and os.path.exists(f"/proc/{pid}") and not _zombie(pid):
            time.sleep(0.02)
        if not os.path.exists(f"/proc/{pid}") or _zombie(pid):
            break
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
        return st[st.rindex(")") + 2] == "Z"
    except OSError:
        return False


def fio(uri, wl, runtime, ramp):
    cmd = ["fio", "--name=w", "--ioengine=nbd", f"--uri={uri}", f"--size={IMAGE_SIZE}",
           "--time_based", f"--runtime={runtime}", f"--ramp_time={ramp}", "--group_reporting",
           "--output-format=json"] + wl.fio_args()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    j = json.loads(out[out.index("{"):])["jobs"][0]
    r, w = j["read"], j["write"]
    return {
        "iops": r["iops"] + w["iops"],
        "mbps": (r["bw_bytes"] + w["bw_bytes"]) / 1e6,
        "bytes": r["io_bytes"] + w["io_bytes"],
    }


def prefill(uri):
    """Memory stores start empty; write every block so reads move real data."""
    subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri={uri}", f"--size={IMAGE_SIZE}",
                    "--rw=write", "--bs=1M", "--iodepth=8", "--output-format=terse"],
                   check=True, capture_output=True)


def run_once(server, wl, image, tmp, runtime, ramp):
    port = free_port()
    proc = subprocess.Popen(server.argv(port, image, wl.store, tmp), env=server.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    pid = proc.pid
    try:
        daemon = isinstance(server, NbdServer)
        wait_port(port, proc, daemonizes=daemon)
        pid = server.daemon_pid(tmp) or proc.pid
        uri = f"nbd://127.0.0.1:{port}/{server.export()}"
        if (wl.store == "memory" and server.name != "nbdkit null") or \
                (isinstance(server, LongwireStore) and server.needs_prefill()):
            prefill(uri)
        sampler = Sampler(pid)
        sampler.start()
        cpu0 = cpu_seconds(tree(pid))
        res = fio(uri, wl, runtime, ramp)
        cpu1 = cpu_seconds(tree(pid))
        sampler.stop.set()
        sampler.join()
        gib = res["bytes"] / (1 << 30)
        res["cpu_per_gib"] = (cpu1 - cpu0) / gib if gib else float("nan")
        res["rss_mib"] = sampler.peak / (1 << 20)
        return res
    finally:
        stop(proc, pid)


@dataclass
class Cell:
    runs: list = field(default_factory=list)

    def median(self, key):
        return statistics.median(r[key] for r in self.runs)


# Images made (or found untouched) in this run; each is checked once.
_images_ready = set()


def make_image(path):
    """1 GiB of random data at path. An image from an earlier run is reused
    only if nothing has written to it since it was made (its mtime still
    matches the stamp beside it): the write workloads overwrite it, and the
    tables promise random data."""
    if path in _images_ready:
        return
    _images_ready.add(path)
    stamp = path + ".random"
    try:
        with open(stamp) as f:
            if os.path.getsize(path) == IMAGE_SIZE and int(f.read()) == os.stat(path).st_mtime_ns:
                return
    except (OSError, ValueError):
        pass
    print(f"creating {path} (1 GiB of random data)", file=sys.stderr)
    with open(path + ".tmp", "wb") as f:
        for _ in range(IMAGE_SIZE // (1 << 20)):
            f.write(os.urandom(1 << 20))
    os.replace(path + ".tmp", path)
    with open(stamp, "w") as f:
        f.write(str(os.stat(path).st_mtime_ns))


def versions():
    def first_line(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"
    nbd_server = "?"
    try:
        p = subprocess.run(["nbd-server", "-V"], capture_output=True, text=True)
        nbd_server = (p.stdout + p.stderr).strip().splitlines()[0]
    except OSError:
        pass
    return {
        "longwire": first_line([LONGWIRE, "--version"]),
        "nbdkit": first_line(["nbdkit", "--version"]),
        "qemu-nbd": first_line(["qemu-nbd", "--version"]),
        "nbd-server": nbd_server,
        "fio": first_line(["fio", "--version"]),
        "qemu-img": first_line(["qemu-img", "--version"]),
    }


def machine():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return f"{os.cpu_count()} cores ({model}), {mem:.0f} GiB RAM, Linux {platform.release()}"


# Everything from this line on in docs/BENCHMARKS.md is written by hand and
# survives regeneration.
LOG_MARKER = "## Optimisation log"


def fmt(v, digits=0):
    return f"{v:,.{digits}f}"


def report(results, workloads, args, elapsed):
    lines = [
        "# Benchmarks",
        "",
        "Generated by `bench/run` — do not edit by hand; re-run to refresh.",
        "",
        f"- Machine: {machine()}",
        f"- Command: `bench/run {' '.join(sys.argv[1:])}`".rstrip()
        + (" (refreshed only its own cells; the others are kept from the earlier full run)"
           if args.only or args.servers else ""),
        f"- Each cell: median of {args.reps} interleaved runs of {args.runtime} s (after {args.ramp} s ramp), "
        f"fio's `nbd` engine (libnbd) over TCP loopback, a fresh server per run, the same 1 GiB image of random data.",
        "- CPU s/GiB: server CPU time (user+system, whole process tree, from /proc) per GiB moved.",
        "- RSS: peak resident memory of the server process tree during the run.",
        "- Ratio: longwire ÷ best peer on that metric (throughput: higher is better; CPU and RSS: lower is better).",
        (f"- {'Time of this run' if args.only or args.servers else 'Total time'}: {elapsed / 60:.1f} min; "
         f"load average (1 min) at its start {args.load:.1f} on {os.cpu_count()} cores."
         if elapsed == elapsed else "- Rewritten from the saved BENCHMARKS.json."),
        "",
        "| tool | version |",
        "|---|---|",
    ]
    for k, v in versions().items():
        lines.append(f"| {k} | {v} |")
    lines += ["", "| server | settings |", "|---|---|"]
    for s in SERVERS + ISCSI_SERVERS:
        lines.append(f"| {s.name} | {s.settings} |")
    lines += stores_table(results, [w for w in workloads if w.store == "stores"])
    for wl in workloads:
        if wl.store == "stores":
            continue
        cells = {s: c for (w, s), c in results.items() if w == wl.name and c.runs}
        if not cells:
            continue
        lines += ["", f"## {wl.name}", "", "| server | IOPS | MB/s | CPU s/GiB | peak RSS MiB |", "|---|---:|---:|---:|---:|"]
        for s, c in cells.items():
            lines.append(f"| {s} | {fmt(c.median('iops'))} | {fmt(c.median('mbps'), 1)} | "
                         f"{fmt(c.median('cpu_per_gib'), 2)} | {fmt(c.median('rss_mib'), 1)} |")
        ours = [s for s in cells if s.startswith("longwire")]
        peers = [s for s in cells if not s.startswith("longwire")]
        if ours and peers:
            me = cells[ours[0]]
            best_iops = max(cells[p].median("iops") for p in peers)
            best_cpu = min(cells[p].median("cpu_per_gib") for p in peers)
            # The null plugin stores nothing, so it is no yardstick for memory.
            holders = [p for p in peers if p != "nbdkit null"] or peers
            best_rss = min(cells[p].median("rss_mib") for p in holders)
            lines.append("")
            lines.append(f"Ratio {ours[0]} ÷ best peer: throughput **{me.median('iops') / best_iops:.2f}×**, "
                         f"CPU/GiB {me.median('cpu_per_gib') / best_cpu:.2f}×, RSS {me.median('rss_mib') / best_rss:.2f}×")
            for p in peers:
                lines.append(f"- vs {p}: throughput {me.median('iops') / cells[p].median('iops'):.2f}×")
    lines.append("")
    return "\n".join(lines)


def stores_table(results, workloads):
    """One row per longwire store: the same jobs through NBD, side by side."""
    names = [s.name for s in STORE_SERVERS]
    names += sorted({s for (_, s) in results if s.startswith("store ") and s not in names})
    rows = []
    for name in names:
        cells = [results.get((w.name, name)) for w in workloads]
        if not any(c and c.runs for c in cells):
            continue
        row = [name.removeprefix("store ")]
        cpu, rss = [], []
        for w, c in zip(workloads, cells):
            if not (c and c.runs):
                row.append("–")
                cpu.append("–")
                continue
            row.append(f"{fmt(c.median('iops'))} IOPS" if w.bs == "4k" else f"{fmt(c.median('mbps'), 1)} MB/s")
            cpu.append(fmt(c.median("cpu_per_gib"), 2))
            rss.append(c.median("rss_mib"))
        row.append(" / ".join(cpu))
        row.append(fmt(max(rss), 1) if rss else "–")
        rows.append(row)
    if not rows:
        return []
    settings = {s.name.removeprefix("store "): s.settings for s in STORE_SERVERS}
    out = ["", "## Stores", "",
           "longwire serving the same 1 GiB of random data from each of its stores, through NBD "
           "(fio's `nbd` engine, same runs and medians as below). CPU s/GiB per column, in order; "
           "peak RSS is the largest of the three.", "",
           "| store | " + " | ".join(w.name.removeprefix("stores ") for w in workloads) +
           " | CPU s/GiB | peak RSS MiB |",
           "|---|" + "---:|" * (len(workloads) + 2)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out += [""] + [f"- {k}: {v}" for k, v in settings.items() if any(r[0] == k for r in rows)]
    return out


def load_saved(path):
    """Results of an earlier run, from BENCHMARKS.json ({} if none)."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return {}
    results = {}
    for key, runs in saved.items():
        w, srv = key.split(" | ", 1)
        results[(w, srv)] = Cell(runs)
    return results


def all_workloads():
    return file_workloads() + memory_workloads() + iscsi_workloads() + store_workloads()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 repetition of 2 s runs (smoke test)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=6)
    ap.add_argument("--ramp", type=int, default=1)
    ap.add_argument("--only", nargs="*", help="run only workloads whose name contains one of these")
    ap.add_argument("--servers", nargs="*", help="run only these servers")
    ap.add_argument("--output", default=os.path.join(ROOT, "docs", "BENCHMARKS.md"))
    ap.add_argument("--from-json", help="rewrite the report from a saved BENCHMARKS.json instead of running")
    ap.add_argument("--image-dir", default=os.environ.get("LONGWIRE_BENCH_DIR", os.path.join(ROOT, "target", "bench")))
    args = ap.parse_args()
    if args.quick:
        args.reps, args.runtime, args.ramp = 1, 2, 0
    args.load = os.getloadavg()[0]  # other work on the machine skews every number

    if args.from_json:
        results = load_saved(args.from_json)
        write_report(report(results, all_workloads(), args, float("nan")), args.output)
        return

    for tool in ("fio", "nbdkit", "qemu-nbd", "nbd-server", "tgtd", "tgtadm", "qemu-img", "iscsi-perf"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} not found; run bench/run, which installs it")
    os.makedirs(args.image_dir, exist_ok=True)
    image = os.path.join(args.image_dir, "bench.img")
    make_image(image)

    workloads = all_workloads()
    if args.only:
        workloads = [w for w in workloads if any(o in w.name for o in args.only)]
    servers = [s for s in SERVERS + ISCSI_SERVERS + STORE_SERVERS if not args.servers or s.name in args.servers]
    # A partial run refreshes its cells and keeps every other one.
    partial = bool(args.only or args.servers)
    results = load_saved(os.path.splitext(args.output)[0] + ".json") if partial else {}
    for wl in workloads:
        for s in servers:
            results.pop((wl.name, s.name), None)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for wl in workloads:
            eligible = [s for s in servers if wl.store in s.stores]
            for rep in range(args.reps):
                for s in eligible:  # interleaved: A, B, C, A, B, C, ...
                    cell = results.setdefault((wl.name, s.name), Cell())
                    try:
                        if isinstance(wl, IscsiWorkload):
                            r = run_iscsi_once(s, wl, image, tmp, args.runtime)
                        else:
                            r = run_once(s, wl, image, tmp, args.runtime, args.ramp)
                    except (RuntimeError, subprocess.CalledProcessError) as e:
                        print(f"  {wl.name:32} {s.name:16} FAILED: {e}", file=sys.stderr)
                        continue
                    cell.runs.append(r)
                    print(f"  {wl.name:32} {s.name:16} rep {rep + 1}: {r['iops']:10,.0f} IOPS "
                          f"{r['mbps']:8,.1f} MB/s  cpu {r['cpu_per_gib']:6.2f} s/GiB  rss {r['rss_mib']:6.1f} MiB",
                          file=sys.stderr, flush=True)
    write_report(report(results, all_workloads() if partial else workloads, args, time.time() - t0), args.output)
    with open(os.path.splitext(args.output)[0] + ".json", "w") as f:
        json.dump({f"{w} | {s}": c.runs for (w, s), c in results.items()}, f, indent=1)
    print(f"wrote {args.output}", file=sys.stderr)


def write_report(text, output):
    """Write the report, keeping the hand-written optimisation log."""
    try:
        with open(output) as f:
            old = f.read()
        if LOG_MARKER in old:
            text += "\n" + old[old.index(LOG_MARKER):]
    except OSError:
        pass
    with open(output, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
