"""`precision: auto` picks fp32 or bf16 by measuring this machine, not by the kind of device.

Whether bf16 is faster depends on the CPU, not on "CPU vs GPU": on an AVX512-BF16 EPYC (issue #10)
a LoRA step of SmolLM2 ran 1.89x faster in bf16 than in fp32 (matmul 901 vs 218 GFLOP/s), on an
AVX512-BF16 Xeon 0.56x (matmul 159 vs 316), and on the AVX2 EPYC this was written on bf16 matrix
products ran at 0.3 GFLOP/s against 73 in fp32 (BENCHMARKS.md). So the first run on a machine probes:

1. a matrix product of the model's own widths (a few hundred tokens x hidden -> intermediate) in both
   dtypes, a fraction of a second; if bf16 is not faster there, fp32 is chosen without timing a step
   (on a CPU without bf16 instructions a bf16 step of a 135M model takes minutes);
2. otherwise one LoRA training step (forward + backward, after a warm-up step) of the real model on a
   real batch in each precision, from the same initial weights; bf16 is chosen when its step is faster
   and its loss is within `LOSS_TOLERANCE` of the fp32 loss.

The result is cached in a JSON file keyed by the machine (CPU model and flags or GPU name, threads),
the library versions, the device, the method and the model's shape, so later runs (and the other
ranks of a torchrun job) read it instead of measuring. The cache lives under `probe_cache_dir()`:
an explicit argument, else `$SFT_DAGSTER_PROBE_CACHE`, else `probes/` under the storage root (next to
the model cache). Delete the file to measure again.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

PROBE_VERSION = 1
CACHE_FILE = "precision_probe.json"
# bf16 must reproduce the fp32 loss of the same weights on the same batch this closely (relative);
# the same bound as the SmolLM2 validation-loss target in BENCHMARKS.md.
LOSS_TOLERANCE = 0.01
PROBE_TOKENS = 256  # rows of the probe matrix product: a micro-batch's worth of tokens


@dataclass
class PrecisionChoice:
    """The precision a run uses, why, and what was measured to decide it."""

    precision: str
    reason: str
    measured: dict = field(default_factory=dict)
    cached: bool = False

    def to_metadata(self) -> dict:
        return asdict(self)


def probe_cache_dir(explicit: Path | str | None = None) -> Path:
    if explicit is not None:
        return Path(explicit)
    if os.environ.get("SFT_DAGSTER_PROBE_CACHE"):
        return Path(os.environ["SFT_DAGSTER_PROBE_CACHE"])
    from ..storage import default_storage_root

    return default_storage_root() / "probes"


def _cpu_description() -> dict:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"processor": platform.processor() or platform.machine()}
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, re.MULTILINE)
    wanted = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16", "avx_vnni"}
    return {"cpu": model.group(1).strip() if model else platform.machine(),
            "cpu_flags": sorted(wanted & set(flags.group(1).split())) if flags else []}


def machine_key(device: str) -> dict:
    """What a measurement depends on besides the model: hardware, threads and library versions."""
    from importlib.metadata import PackageNotFoundError, version

    libraries = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            libraries[name] = version(name)
        except PackageNotFoundError:
            libraries[name] = None
    key = {"device": device.split(":")[0], "threads": torch.get_num_threads(), **libraries, **_cpu_description()}
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        key["gpu"] = torch.cuda.get_device_name(index)
        key["gpu_capability"] = list(torch.cuda.get_device_capability(index))
    return key


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def matmul_seconds(rows: int, inner: int, cols: int, dtype: torch.dtype, device: str, reps: int = 3) -> float:
    """Best-of-`reps` time of one (rows x inner) @ (inner x cols) product."""
    generator = torch.Generator().manual_seed(0)  # leaves the global RNG (and so training) untouched
    a = torch.randn(rows, inner, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(inner, cols, generator=generator).to(device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def decide(fp32: dict, bf16: dict) -> tuple[str, str]:
    """Pick from two step measurements ({"seconds": s, "loss": l}): the faster, if bf16's loss matches."""
    gap = abs(bf16["loss"] - fp32["loss"]) / max(abs(fp32["loss"]), 1e-12)
    speedup = fp32["seconds"] / bf16["seconds"]
    if gap > LOSS_TOLERANCE:
        return "fp32", (f"bf16 step loss {bf16['loss']:.4f} is {gap:.2%} off fp32's {fp32['loss']:.4f} "
                        f"(tolerance {LOSS_TOLERANCE:.0%}); bf16 step speed {speedup:.2f}x")
    if speedup > 1.0:
        return "bf16", f"bf16 step {speedup:.2f}x as fast as fp32, loss within {gap:.3%}"
    return "fp32", f"bf16 step only {speedup:.2f}x as fast as fp32"


def measure_precision(device: str, widths: tuple[int, int], bf16_supported: bool,
                      time_step: Callable[[str], dict]) -> tuple[str, str, dict]:
    """Run the probe (matrix product gate, then a step in each precision); see the module docstring."""
    if not bf16_supported:
        return "fp32", f"{device} has no bf16 support", {}
    hidden, intermediate = widths
    flops = 2 * PROBE_TOKENS * hidden * intermediate
    rates = {name: float(f"{flops / matmul_seconds(PROBE_TOKENS, hidden, intermediate, dtype, device) / 1e9:.3g}")
             for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    measured = {"matmul_shape": [PROBE_TOKENS, hidden, intermediate], "matmul_gflops": rates}
    if rates["bf16"] <= rates["fp32"]:
        return "fp32", (f"bf16 matrix products slower than fp32 here ({rates['bf16']} vs {rates['fp32']} GFLOP/s "
                        f"at {PROBE_TOKENS}x{hidden}x{intermediate}); no step timed"), measured
    steps = {name: time_step(name) for name in ("fp32", "bf16")}
    measured["step"] = steps
    precision, reason = decide(steps["fp32"], steps["bf16"])
    return precision, reason, measured


def cached_choice(cache_dir: Path, key: dict, measure: Callable[[], tuple[str, str, dict]]) -> PrecisionChoice:
    """The cached choice for `key`, or `measure()`'s, written to the cache (atomically)."""
    digest = hashlib.sha256(json.dumps({"v": PROBE_VERSION, **key}, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / CACHE_FILE
    try:
        cache = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    if digest in cache:
        hit = cache[digest]
        return PrecisionChoice(hit["precision"], hit["reason"], hit["measured"], cached=True)
    precision, reason, measured = measure()
    cache[digest] = {"precision": precision, "reason": reason, "measured": measured, "key": key,
                     "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cache, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return PrecisionChoice(precision, reason, measured, cached=False)
