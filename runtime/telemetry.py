"""GPU and power telemetry for `gaze profile`: NVML where pynvml and a GPU exist; on Jetson the INA3221
power rails (sysfs: the hwmon driver of JetPack 5/6, or the older `ina3221x` iio driver) or,
failing that, `tegrastats`. Whatever is absent is reported as absent, with what was looked for.

`PowerSampler` samples every source in a background thread (or reads tegrastats' own output)
while the timed runs go, and reports mean and max milliwatts per rail.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gaze_edge.errors import interrupt_in_chain


def _reraise_interrupt(exc: BaseException) -> None:
    interrupt = interrupt_in_chain(exc)  # e.g. an interrupt inside pynvml's import, turned into ImportError
    if interrupt is not None:
        raise interrupt from None


# ---------------------------------------------------------------------------------------------- NVML


def _nvml() -> Any:
    import pynvml

    pynvml.nvmlInit()
    return pynvml


def nvml_info() -> dict[str, Any]:
    """GPU 0 by NVML: name, memory used/total, power draw; {"absent": reason} without pynvml or a GPU."""
    try:
        nv = _nvml()
    except ImportError as exc:
        _reraise_interrupt(exc)
        return {"absent": "pynvml is not installed (pip install nvidia-ml-py)"}
    except Exception as exc:  # NVMLError: no driver, no GPU
        _reraise_interrupt(exc)
        return {"absent": f"NVML not usable here ({exc})"}
    try:
        handle = nv.nvmlDeviceGetHandleByIndex(0)
        name = nv.nvmlDeviceGetName(handle)
        mem = nv.nvmlDeviceGetMemoryInfo(handle)
        out: dict[str, Any] = {"device": name.decode() if isinstance(name, bytes) else str(name),
                               "memory_used": int(mem.used), "memory_total": int(mem.total)}
        try:
            out["power_w"] = nv.nvmlDeviceGetPowerUsage(handle) / 1000.0
        except Exception as exc:  # not every GPU reports power (Jetson's iGPU does not through NVML)
            _reraise_interrupt(exc)
            out["power_w"] = None
        return out
    except Exception as exc:
        _reraise_interrupt(exc)
        return {"absent": f"NVML has no GPU 0 ({exc})"}


def _nvml_power_reader() -> Callable[[], float | None] | None:
    try:
        nv = _nvml()
        handle = nv.nvmlDeviceGetHandleByIndex(0)
        nv.nvmlDeviceGetPowerUsage(handle)
    except Exception as exc:
        _reraise_interrupt(exc)
        return None
    return lambda: float(nv.nvmlDeviceGetPowerUsage(handle))  # mW


# ------------------------------------------------------------------------------------- INA3221 rails


@dataclass(frozen=True)
class Rail:
    """One INA3221 channel: read() gives milliwatts."""

    name: str
    source: str  # "hwmon" or "ina3221x"
    power: Path | None = None  # ina3221x: in_power{N}_input (mW)
    voltage: Path | None = None  # hwmon: in{N}_input (mV)
    current: Path | None = None  # hwmon: curr{N}_input (mA)

    def read(self) -> float:
        if self.power is not None:
            return float(self.power.read_text().split()[0])
        assert self.voltage is not None and self.current is not None
        return float(self.voltage.read_text().split()[0]) * float(self.current.read_text().split()[0]) / 1000.0


def _text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def find_rails(sys_root: Path = Path("/sys")) -> list[Rail]:
    """The INA3221 power rails readable under sys_root (Jetson); [] elsewhere."""
    rails: list[Rail] = []
    seen: set[Path] = set()
    hwmons = [p.parent for p in sys_root.glob("class/hwmon/hwmon*/name") if _text(p) == "ina3221"]
    hwmons += list(sys_root.glob("bus/i2c/drivers/ina3221/*/hwmon/hwmon*"))
    for folder in hwmons:
        real = folder.resolve()
        if real in seen:
            continue
        seen.add(real)
        for label in sorted(folder.glob("in*_label")):
            n = label.name[2:-len("_label")]
            voltage, current = folder / f"in{n}_input", folder / f"curr{n}_input"
            if voltage.is_file() and current.is_file():  # the sum channel has no current of its own
                rails.append(Rail(_text(label) or f"in{n}", "hwmon", voltage=voltage, current=current))
    for power in sorted(sys_root.glob("bus/i2c/drivers/ina3221x/*/iio:device*/in_power*_input")):
        n = power.name[len("in_power"):-len("_input")]
        name = _text(power.parent / f"rail_name_{n}") or f"rail {n}"
        rails.append(Rail(name, "ina3221x", power=power))
    readable = []
    for rail in rails:
        try:
            rail.read()
        except (OSError, ValueError, IndexError):
            continue
        readable.append(rail)
    return readable


# ----------------------------------------------------------------------------------------- tegrastats

#: "VDD_GPU_SOC 1189mW/1189mW" (JetPack 5/6) or "POM_5V_GPU 120/130" (JetPack 4): current/average.
_TEGRA_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")


def parse_tegrastats(line: str) -> dict[str, float]:
    """Milliwatts now per power rail in one tegrastats line (RAM, SWAP, IRAM... are not rails: skipped)."""
    return {m.group(1): float(m.group(2)) for m in _TEGRA_RAIL.finditer(line)}


# -------------------------------------------------------------------------------------------- sampler


class PowerSampler:
    """Samples power while a block runs: `with PowerSampler() as s: ...; s.summary()`."""

    def __init__(self, interval_s: float = 0.1, sys_root: Path = Path("/sys"), tegrastats: str | None = "",
                 nvml: bool = True) -> None:
        self.interval_s = interval_s
        self.samples: dict[str, list[float]] = {}
        self.sources: list[str] = []
        self.looked: list[str] = []
        self._readers: dict[str, Callable[[], float | None]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        reader = _nvml_power_reader() if nvml else None
        if reader is not None:
            self._readers["GPU (NVML)"] = reader
            self.sources.append("NVML power")
        else:
            self.looked.append("NVML power (pynvml and a GPU that reports power)")
        rails = find_rails(sys_root)
        for rail in rails:
            self._readers[rail.name] = rail.read
        if rails:
            self.sources.append(f"INA3221 rails ({rails[0].source}, {sys_root})")
        else:
            self.looked.append(f"INA3221 rails under {sys_root} (hwmon ina3221 or bus/i2c/drivers/ina3221x)")
        # tegrastats reads the same rails: used only where they are not readable directly.
        self._tegrastats = None
        if not rails and tegrastats is not None:
            self._tegrastats = tegrastats or shutil.which("tegrastats")
            if self._tegrastats is None:
                self.looked.append("tegrastats on PATH")
            else:
                self.sources.append(f"tegrastats ({self._tegrastats})")

    @property
    def present(self) -> bool:
        return bool(self.sources)

    def __enter__(self) -> PowerSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self._readers:
            self._thread = threading.Thread(target=self._sample, name="gaze-power", daemon=True)
            self._thread.start()
        if self._tegrastats:
            try:
                self._proc = subprocess.Popen([self._tegrastats, "--interval", str(max(1, int(self.interval_s * 1e3)))],
                                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            except OSError as exc:
                self.sources.remove(f"tegrastats ({self._tegrastats})")
                self.looked.append(f"tegrastats ({self._tegrastats}: {exc})")
                self._tegrastats = None
                return
            self._reader = threading.Thread(target=self._read_tegrastats, name="gaze-tegrastats", daemon=True)
            self._reader.start()

    def _record(self, name: str, value: float | None) -> None:
        if value is not None:
            self.samples.setdefault(name, []).append(float(value))

    def _sample(self) -> None:
        while True:
            for name, read in self._readers.items():
                try:
                    self._record(name, read())
                except Exception as exc:  # a rail that stops answering is skipped, the others go on
                    _reraise_interrupt(exc)
            if self._stop.wait(self.interval_s):
                return

    def _read_tegrastats(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            for name, mw in parse_tegrastats(line).items():
                self._record(name, mw)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._proc is not None:
            deadline = time.monotonic() + 2.0  # a block shorter than tegrastats' interval still gets a line
            while not self.samples and self._proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._reader is not None:
                self._reader.join(timeout=5)

    def summary(self) -> dict[str, Any]:
        """Mean and max mW per rail over the block; {"absent": ...} naming what was looked for when none exist."""
        if not self.present:
            return {"absent": "no power telemetry here; looked for " + ", ".join(self.looked)}
        rails = {name: {"mean_mw": sum(v) / len(v), "max_mw": max(v), "samples": len(v)}
                 for name, v in self.samples.items() if v}
        return {"sources": self.sources, "interval_ms": self.interval_s * 1e3, "rails": rails,
                "not_found": self.looked}

