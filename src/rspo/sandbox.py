"""Running untrusted programs (model-written code) so that no program can harm the machine, the run or its data.

    result = run_python(code, stdin="1 2\\n", limits=Limits(wall_s=4))   # RunResult(status, stdout, ...)
    isolation()                                                          # the layers active here

Every program runs in its own process, never in the caller's interpreter, in a fresh temporary
directory removed afterwards, with a stripped environment. Layers, each used when the machine offers it
(:func:`isolation` says which are active; the first four hold everywhere):

1. resource limits (``setrlimit``): CPU time, address space, file size, open files, no core dumps;
2. a wall-clock limit that kills the whole process group; stdout and stderr capped in size;
3. the caller becomes a child subreaper, so a daemon that escapes the process group (``setsid``) is
   still found and killed when the program ends: no process survives a call;
4. a bootstrap interpreter (``python -I -S``) that applies the layers below, then ``execve``s the program;
5. namespaces (``unshare``: pid, network, mount, ipc, uts): no network at all (a fresh network namespace),
   a private ``/tmp`` (tmpfs, size-limited) holding the working directory, and every process of the
   program killed with it (it is pid 1 of its namespace);
6. Landlock (Linux >= 5.13, unprivileged): nothing readable but the interpreter's installation and the system
   directories (not homes, not the project, not the run's data), nothing writable but the working
   directory, no TCP bind or connect, and (ABI >= 6) no signals or abstract sockets outside the sandbox;
   and an empty capability bounding set (a root caller's program runs without privileges);
7. a cgroup per run (the pids controller, where it is writable): at most ``processes`` processes and threads
   (a fork bomb stops there), and every process of the run, wherever it went, is killed at the end.

What this does not stop: kernel exploits, side channels, timing; a determined attacker with a kernel
bug. Production users should put an external sandbox (a container or VM per program, e.g. a
SandboxFusion server: :class:`SandboxFusion`) behind it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Literal

Status = Literal["ok", "runtime_error", "timeout", "memory", "output_limit", "sandbox_error"]


@dataclass(frozen=True)
class Limits:
    """Limits of one program run."""

    wall_s: float = 5.0
    """Wall-clock seconds, then the process group (and namespace) is killed."""
    cpu_s: int = 4
    """CPU seconds (RLIMIT_CPU)."""
    memory_mb: int = 512
    """Address space in MiB (RLIMIT_AS)."""
    file_mb: int = 16
    """Largest file it may write (RLIMIT_FSIZE), and the size of its private /tmp."""
    open_files: int = 64
    """Open file descriptors (RLIMIT_NOFILE)."""
    processes: int = 32
    """Processes and threads (the run's cgroup pids.max, where a pids cgroup is writable)."""
    output_kb: int = 1024
    """stdout and stderr together, in KiB; more and the program is killed (status output_limit)."""

    def __post_init__(self) -> None:
        for name, v in asdict(self).items():
            if not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"sandbox limit {name} must be > 0, got {v!r}")


@dataclass
class RunResult:
    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float


# ----------------------------------------------------------------------------------------
# The bootstrap: runs in the sandboxed process, applies the layers, then execs the program
# ----------------------------------------------------------------------------------------
_BOOT = r"""
import ctypes, json, os, resource, sys
spec = json.loads(sys.argv[1])
code = b"".join(iter(lambda: os.read(spec["code_fd"], 1 << 20), b"")).decode("utf-8", "replace")
os.close(spec["code_fd"])
libc = ctypes.CDLL(None, use_errno=True)
def die(msg):
    os.write(2, ("rspo-sandbox: " + msg + "\n").encode()); os._exit(120)
if spec["cgroup"]:  # join the run's pids cgroup first: everything this process starts is counted and killed
    with open(spec["cgroup"], "w") as f:
        f.write(str(os.getpid()))
work = spec["work"]
if spec["mount"]:
    MS_NOSUID, MS_NODEV = 2, 4
    for d in spec["private"]:
        if os.path.isdir(d) and libc.mount(b"tmpfs", d.encode(), b"tmpfs", MS_NOSUID | MS_NODEV,
                                           ("size=%dk,mode=1777" % (spec["file_kb"] * 4)).encode()) != 0:
            die("mount %s: %s" % (d, os.strerror(ctypes.get_errno())))
    if "/tmp" in spec["private"]:
        work = "/tmp/work"
        os.mkdir(work, 0o700)
with open(os.path.join(work, "main.py"), "w") as f:
    f.write(code)
os.chdir(work)
lim = spec["limits"]
for res, val in ((resource.RLIMIT_CPU, lim["cpu_s"]), (resource.RLIMIT_AS, lim["memory_mb"] << 20),
                 (resource.RLIMIT_FSIZE, lim["file_mb"] << 20), (resource.RLIMIT_NOFILE, lim["open_files"]),
                 (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(res, (val, val))
for cap in range(64):  # an empty capability bounding set: root without any privilege after execve
    libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP (unknown capability numbers just fail)
ll = spec["landlock"]
if ll:
    abi = ll["abi"]
    fs_all = (1 << 13) - 1  # ABI 1's rights; REFER (ABI 2), TRUNCATE (3), IOCTL_DEV (5) as the kernel has them
    for bit, since in ((13, 2), (14, 3), (15, 5)):
        fs_all |= (1 << bit) if abi >= since else 0
    net = 3 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP: handled, no rule allows them
    scoped = 3 if abi >= 6 else 0  # abstract unix sockets | signals outside the domain
    size = 24 if abi >= 6 else (16 if abi >= 4 else 8)
    attr = (ctypes.c_uint64 * 3)(fs_all, net, scoped)
    rs = libc.syscall(444, ctypes.byref(attr), size, 0)
    if rs < 0:
        die("landlock_create_ruleset: " + os.strerror(ctypes.get_errno()))
    class Beneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]
    read_only = 1 | 4 | 8  # EXECUTE | READ_FILE | READ_DIR: the interpreter and the system, nothing else
    rules = [(d, read_only) for d in spec["readable"] if os.path.exists(d)]
    rules += [(work, fs_all), ("/dev/null", 2 | 4 | ((1 << 14) if abi >= 3 else 0))]
    for path, access in rules:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = Beneath(access & fs_all, fd)
        if libc.syscall(445, rs, 1, ctypes.byref(rule), 0) != 0:
            die("landlock_add_rule %s: %s" % (path, os.strerror(ctypes.get_errno())))
        os.close(fd)
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.syscall(446, rs, 0) != 0:  # no_new_privs, restrict_self
        die("landlock_restrict_self: " + os.strerror(ctypes.get_errno()))
env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
os.execve(spec["python"], [spec["python"], "-I", "main.py"], env)
"""


# ----------------------------------------------------------------------------------------
# What the machine offers (probed once)
# ----------------------------------------------------------------------------------------
def _landlock_abi() -> int:
    if sys.platform != "linux":
        return 0
    try:
        r = ctypes.CDLL(None, use_errno=True).syscall(444, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    except (OSError, AttributeError):
        return 0
    return max(int(r), 0)


def _namespaces_work() -> bool:
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return False
    cmd = ["unshare", "--fork", "--pid", "--mount-proc", "--net", "--mount", "--ipc", "--uts", "--kill-child", "true"]
    if os.geteuid() != 0:
        cmd[1:1] = ["--user", "--map-root-user"]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _pids_cgroup_root() -> str | None:
    """A writable pids-cgroup directory to make per-run cgroups in (v1 ``/sys/fs/cgroup/pids`` or v2), or None."""
    for root in ("/sys/fs/cgroup/pids", "/sys/fs/cgroup"):
        if not os.path.isdir(root):
            continue
        probe = os.path.join(root, f"rspo-probe-{os.getpid()}")
        try:
            os.mkdir(probe)
            ok = os.path.isfile(os.path.join(probe, "pids.max"))
            os.rmdir(probe)
        except OSError:
            continue
        if ok:
            return root
    return None


@lru_cache(maxsize=1)
def _probe() -> dict:
    return {"namespaces": _namespaces_work(), "landlock": _landlock_abi(), "cgroup": _pids_cgroup_root()}


def isolation() -> list[str]:
    """The layers active on this machine, by name (see the module docstring)."""
    p = _probe()
    layers = ["rlimits", "wall-clock kill of the process group", "subreaper: no surviving process"]
    if p["namespaces"]:
        private = ", ".join(_private_dirs()) or "none: the interpreter lives under them"
        layers.append(f"namespaces: pid, net (no network), mount (private {private}), ipc, uts")
    if p["landlock"]:
        extra = ", no TCP" if p["landlock"] >= 4 else ""
        extra += ", no signals outside" if p["landlock"] >= 6 else ""
        layers.append(
            f"landlock ABI {p['landlock']}: reads only the interpreter and system dirs, writes only the work dir{extra}"
        )
    if p["cgroup"]:
        layers.append("pids cgroup per run: process limit, every process killed at the end")
    return layers


_subreaper_set = False
_runs = [0]
_runs_lock = threading.Lock()
_active: set[int] = set()  # the sandboxes this process started and still waits for (not orphans)
_active_lock = threading.Lock()


def _set_subreaper() -> None:
    global _subreaper_set
    if not _subreaper_set and sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
        _subreaper_set = True


def _new_cgroup(root: str, processes: int) -> str | None:
    """A fresh pids cgroup for one run, limited to ``processes``; None if it cannot be made."""
    with _runs_lock:
        _runs[0] += 1
        name = f"rspo-sbx-{os.getpid()}-{_runs[0]}"
    d = os.path.join(root, name)
    try:
        os.mkdir(d)
        with open(os.path.join(d, "pids.max"), "w") as f:
            f.write(str(processes))
    except OSError:
        return None
    return d


def _kill_cgroup(d: str) -> None:
    """SIGKILL every process in cgroup ``d`` until it is empty, then remove it."""
    procs = os.path.join(d, "cgroup.procs")
    for _ in range(200):
        try:
            with open(procs) as f:
                pids = [int(x) for x in f.read().split()]
        except OSError:
            break
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)
    _reap_orphans()
    with contextlib.suppress(OSError):
        os.rmdir(d)


def _reap_orphans() -> None:
    """Kill and wait for processes re-parented to us (we are a subreaper): escaped descendants of a run,
    never a sandbox another thread of this process is still running."""
    me = str(os.getpid())
    with _active_lock:
        active = set(_active)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields[1] == me and int(pid) not in active:  # ppid
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(pid), signal.SIGKILL)
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(int(pid), 0)


def _interpreter() -> str:
    """The interpreter programs run with: the real file behind ``sys.executable`` (a virtual environment's
    ``bin/python`` is a link to it), so a venv under /tmp does not vanish with the private /tmp."""
    return os.path.realpath(sys.executable)


def _private_dirs() -> list[str]:
    """The directories the mount namespace replaces by a private tmpfs: /tmp, /dev/shm and /var/tmp, except
    one that holds the interpreter's installation (it would vanish; Landlock still limits writes there)."""
    need = [_interpreter(), os.path.realpath(sys.base_prefix)]
    return [d for d in ("/tmp", "/dev/shm", "/var/tmp") if not any(p == d or p.startswith(d + "/") for p in need)]


def _readable() -> list[str]:
    """What a program may read (and execute) under Landlock: the interpreter's installation and the system."""
    dirs = {sys.base_prefix, sys.prefix, os.path.dirname(_interpreter())}
    dirs |= {"/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc", "/proc", "/dev"}
    return sorted(dirs)


def run_python(code: str, stdin: str = "", limits: Limits | None = None) -> RunResult:
    """Run ``code`` as ``python -I main.py`` in the sandbox with ``stdin``; see the module docstring."""
    limits = limits or Limits()
    p = _probe()
    _set_subreaper()
    host_work = tempfile.mkdtemp(prefix="rspo-sbx-")
    cgroup = _new_cgroup(p["cgroup"], limits.processes) if p["cgroup"] else None
    code_r, code_w = os.pipe()
    spec = {
        "work": host_work,
        "mount": p["namespaces"],
        "limits": asdict(limits),
        "code_fd": code_r,
        "file_kb": limits.file_mb * 1024,
        "python": _interpreter(),
        "private": _private_dirs(),
        "cgroup": os.path.join(cgroup, "cgroup.procs") if cgroup else None,
        "readable": _readable(),
        "landlock": {"abi": p["landlock"]} if p["landlock"] else None,
    }
    cmd = [sys.executable, "-I", "-S", "-c", _BOOT, json.dumps(spec)]
    if p["namespaces"]:
        ns = ["unshare", "--fork", "--pid", "--mount-proc", "--net", "--mount", "--ipc", "--uts", "--kill-child"]
        cmd = (ns[:1] + (["--user", "--map-root-user"] if os.geteuid() != 0 else []) + ns[1:]) + cmd
    t0 = time.monotonic()
    try:
        with _active_lock:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(code_r,),
                start_new_session=True,
                env={"PATH": "/usr/bin:/bin"},
                cwd=host_work,
            )
            _active.add(proc.pid)
    except OSError as e:
        os.close(code_r)
        os.close(code_w)
        shutil.rmtree(host_work, ignore_errors=True)
        if cgroup:
            _kill_cgroup(cgroup)
        return RunResult("sandbox_error", None, "", f"cannot start the sandbox: {e}", 0.0)
    os.close(code_r)
    try:
        status, out, err = _communicate(proc, code, code_w, stdin, limits, t0)
    finally:
        with _active_lock:
            _active.discard(proc.pid)
    if cgroup:
        _kill_cgroup(cgroup)
    _reap_orphans()
    shutil.rmtree(host_work, ignore_errors=True)
    wall = time.monotonic() - t0
    rc = proc.returncode
    if status is None:
        status = _classify(rc, err)
    return RunResult(status, rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), wall)


def _communicate(
    proc: subprocess.Popen, code: str, code_w: int, stdin: str, limits: Limits, t0: float
) -> tuple[Status | None, bytes, bytes]:
    """Feed the program and its input, read stdout and stderr up to the cap, enforce the wall clock."""
    feeds = {code_w: code.encode("utf-8", "replace"), proc.stdin.fileno(): stdin.encode()}
    closers = {code_w: lambda: os.close(code_w), proc.stdin.fileno(): proc.stdin.close}
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    open_fds = set(bufs)
    cap = limits.output_kb * 1024
    for fd in [*feeds, *bufs]:
        os.set_blocking(fd, False)
    status: Status | None = None
    while open_fds:
        left = limits.wall_s - (time.monotonic() - t0)
        if left <= 0:
            status = "timeout"
            break
        r, w, _ = select.select(list(open_fds), list(feeds), [], min(left, 0.5))
        for fd in w:
            try:
                n = os.write(fd, feeds[fd][:65536])
                feeds[fd] = feeds[fd][n:]
            except (BrokenPipeError, BlockingIOError, OSError):
                feeds[fd] = b""
            if not feeds[fd]:
                with contextlib.suppress(OSError):
                    closers[fd]()
                del feeds[fd]
        for fd in r:
            try:
                chunk = os.read(fd, 65536)
            except (BlockingIOError, OSError):
                chunk = b""
            if not chunk:
                open_fds.discard(fd)
                continue
            bufs[fd] += chunk
        if sum(len(b) for b in bufs.values()) > cap:
            status = "output_limit"
            break
    for fd in feeds:
        with contextlib.suppress(OSError):
            closers[fd]()
    if status is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    while True:  # wait4: the exit status and the CPU time of the program (unshare's waited-for child included)
        pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() - t0 > limits.wall_s:
            status = status or "timeout"
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            pid, st, ru = os.wait4(proc.pid, 0)
            break
        time.sleep(0.002)
    proc.returncode = os.waitstatus_to_exitcode(st)
    if status is None and proc.returncode != 0 and ru.ru_utime + ru.ru_stime >= 0.95 * limits.cpu_s:
        status = "timeout"  # RLIMIT_CPU (SIGXCPU: unshare reports it as a plain exit code)
    out, err = bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()])
    proc.stdout.close()
    proc.stderr.close()
    return status, out[:cap], err[:cap]


def _classify(rc: int | None, err: bytes) -> Status:
    if rc == 0:
        return "ok"
    if rc == 120 and err.startswith(b"rspo-sandbox:"):
        return "sandbox_error"
    if rc is not None and rc < 0 and -rc in (signal.SIGXCPU, signal.SIGKILL):
        return "timeout" if -rc == signal.SIGXCPU else "memory"
    if b"MemoryError" in err[-4096:]:
        return "memory"
    return "runtime_error"
