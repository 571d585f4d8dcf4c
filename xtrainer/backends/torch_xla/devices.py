"""What torch_xla sees: the device type and devices (for `xtrainer info`)."""

from __future__ import annotations

from typing import Any


def list_devices() -> dict[str, Any]:
    """{"status", "device_type", "device_count", "devices": [names]} from the torch_xla runtime."""
    import torch_xla  # imported on call: starting the runtime is the point of this function
    import torch_xla.runtime as xr

    devices = torch_xla.devices() if hasattr(torch_xla, "devices") else None
    if devices is None:
        import torch_xla.core.xla_model as xm

        devices = xm.get_xla_supported_devices()
    return {"status": "ok", "device_type": xr.device_type(), "device_count": len(devices),
            "devices": [str(d) for d in devices]}
