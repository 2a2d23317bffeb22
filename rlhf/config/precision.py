"""trainer.precision=auto: the precision chosen for the machine at start-up, decided without
importing Lightning (a config is checked before anything heavy loads)."""

from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# What trainer.precision accepts: "auto" (chosen for the machine at start-up) and Lightning's values.
PRECISIONS = (
    "auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true",
    "transformer-engine", "transformer-engine-float16", "64", "32", "16", "bf16", 64, 32, 16,
)
# The x86 flag of fast bf16 matmuls: AMX-BF16 (tile matmuls). AVX512-BF16's dot products alone do
# not qualify: torch's bf16 matmuls there run below its fp32 ones (README, Hardware).
FAST_BF16_CPU_FLAG = "amx_bf16"


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


def auto_precision(accelerator: str, flags: set[str], machine: str | None = None) -> tuple[str, str]:
    """(precision, why) for trainer.precision=auto: bf16 mixed precision (fp32 master weights and
    optimizer state, bf16 matmuls under autocast) where the hardware computes in bf16, else fp32.

    On the CPU only x86 processors with AMX qualify: bf16 pays where its matmuls beat fp32's, which
    takes tile instructions; with AVX512-BF16 alone, without bf16 instructions (emulated), or on other
    architectures (where torch's bf16 CPU kernels may fall back to slow paths) it is slower than fp32.
    """
    if accelerator in ("gpu", "cuda", "auto"):
        import torch

        if torch.cuda.is_available():
            if torch.cuda.is_bf16_supported():
                return "bf16-mixed", "the GPU supports bf16"
            return "32-true", "the GPU has no bf16 arithmetic"
        if accelerator != "auto":
            return "32-true", "no GPU found"
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686"):
        return "32-true", f"bf16 on {machine} processors is not used by default"
    if FAST_BF16_CPU_FLAG in flags:
        return "bf16-mixed", f"the processor has {FAST_BF16_CPU_FLAG} (AMX bf16 matmuls)"
    if "avx512_bf16" in flags:
        return "32-true", f"the processor has avx512_bf16 but no {FAST_BF16_CPU_FLAG}: bf16 matmuls are slower than fp32 there"
    return "32-true", f"the processor has no bf16 matmul instructions ({FAST_BF16_CPU_FLAG})"


def resolve_precision(trainer: dict[str, Any], cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, Any]:
    """trainer with precision=auto replaced by the precision chosen for this machine (logged)."""
    if trainer.get("precision") != "auto":
        return trainer
    precision, why = auto_precision(str(trainer.get("accelerator", "auto")), cpu_flags(cpuinfo))
    log.info("Precision: %s (trainer.precision=auto: %s; override with trainer.precision=...)", precision, why)
    return {**trainer, "precision": precision}
