"""The one place that knows about devices and kernels.

Nothing outside this package names a device type or imports an accelerator library:
models ask here for the attention kernel, the default device and autocast settings.
"""
from keyetron.backend.device import autocast, default_device, supports_bf16, synchronize  # noqa: F401
