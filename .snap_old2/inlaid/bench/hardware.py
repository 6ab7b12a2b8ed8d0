"""Memory-bandwidth rooflines of the GPUs our benchmarks report against.

H100 80GB HBM3: 3.0 TB/s, the device-to-device copy rate measured on the device tool (issue 8).
H200: 4.8 TB/s, NVIDIA's HBM3e spec figure (no measured copy rate recorded here yet; benchmarks
that run on an H200 say so next to their numbers). Unknown devices get the H100 figure.
"""

from __future__ import annotations

ROOFLINE_TBPS = {"H200": 4.8, "H100": 3.0}


def peak_bandwidth_tbps(device_name: str) -> float:
    """The bandwidth roofline (TB/s) for a ``torch.cuda.get_device_name()`` string."""
    for key, tbps in ROOFLINE_TBPS.items():
        if key in device_name:
            return tbps
    return ROOFLINE_TBPS["H100"]
