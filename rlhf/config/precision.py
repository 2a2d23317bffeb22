"""trainer.precision=auto: the precision chosen for the machine at start-up, decided without
importing Lightning (a config is checked before anything heavy loads)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# What trainer.precision accepts: "auto" (chosen for the machine at start-up) and Lightning's values.
PRECISIONS = (
    "auto",
    "32-true",
    "bf16-mixed",
    "16-mixed",
    "bf16-true",
    "16-true",
    "64-true",
    "transformer-engine",
    "transformer-engine-float16",
    "64",
    "32",
    "16",
    "bf16",
    64,
    32,
    16,
)
# Processor flags of bf16 arithmetic in hardware (x86 AMX tiles or AVX512-BF16 dot products, ARM's
# BF16 extension). Without one of them torch emulates bf16 and its matmuls are always slower than fp32,
# so nothing is measured; with one, the measured rates decide (docs/hardware.md).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")
# bf16 mixed precision adds casts and keeps fp32 master weights: it pays only where bf16 products are
# clearly faster than fp32 ones, not merely as fast.
BF16_MIN_SPEEDUP = 1.25
# The probe's product size: large enough to reach the kernels training uses, small enough that an
# emulated bf16 product costs a few tens of milliseconds.
PROBE_SIZE = 256


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The processor's feature flags from /proc/cpuinfo (empty where it is not readable)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):  # x86 says flags, ARM says Features
            return set(value.split())
    return set()


def matmul_seconds(dtype: Any, size: int, repeats: int = 3) -> list[float]:
    """The times of `repeats` size x size matrix products in dtype on the CPU, after one warm-up."""
    import time

    import torch

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return times


def measured_bf16_speedup(size: int = PROBE_SIZE) -> float:
    """How many times faster this CPU multiplies matrices in bf16 than in fp32, measured now."""
    import statistics

    import torch

    return statistics.median(matmul_seconds(torch.float32, size)) / statistics.median(
        matmul_seconds(torch.bfloat16, size)
    )


def auto_precision(
    accelerator: str, flags: set[str], measure: Callable[[], float] | None = None
) -> tuple[str, str]:
    """(precision, why) for trainer.precision=auto: bf16 mixed precision (fp32 master weights and
    optimizer state, bf16 matmuls under autocast) where the hardware computes in bf16 faster, else fp32.

    On the CPU the flags only rule bf16 out (no bf16 instructions: emulated, always slower); where the
    processor has them, `measure` (bf16's speedup over fp32 on matrix products) decides, since the
    same flag set has run bf16 at three times the fp32 rate on one processor and at half on another.
    """
    if accelerator in ("gpu", "cuda", "auto"):
        import torch

        if torch.cuda.is_available():
            if torch.cuda.is_bf16_supported():
                return "bf16-mixed", "the GPU supports bf16"
            return "32-true", "the GPU has no bf16 arithmetic"
        if accelerator != "auto":
            return "32-true", "no GPU found"
    present = [flag for flag in BF16_CPU_FLAGS if flag in flags]
    if not present:
        return "32-true", f"the processor has no bf16 instructions ({', '.join(BF16_CPU_FLAGS)})"
    speedup = (measure or measured_bf16_speedup)()
    measured = f"bf16 matmuls measured at {speedup:.2f}x the fp32 rate, with {', '.join(present)}"
    if speedup >= BF16_MIN_SPEEDUP:
        return "bf16-mixed", measured
    return "32-true", f"{measured}: below the {BF16_MIN_SPEEDUP}x that pays for mixed precision"


def resolve_precision(trainer: dict[str, Any], cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, Any]:
    """trainer with precision=auto replaced by the precision chosen for this machine (logged)."""
    if trainer.get("precision") != "auto":
        return trainer
    precision, why = auto_precision(str(trainer.get("accelerator", "auto")), cpu_flags(cpuinfo))
    log.info(
        "Precision: %s (trainer.precision=auto: %s; override with trainer.precision=...)", precision, why
    )
    return {**trainer, "precision": precision}
