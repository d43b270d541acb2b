"""The one place that knows about devices and kernels.

Nothing outside this package names a device type or imports an accelerator library:
models ask here for the attention kernel, the default device and autocast settings.
Each kernel has a pure-PyTorch reference beside it that its tests compare against:

- ``device``: device choice and capabilities (the only module that spells device names);
- ``attention``: varlen (packed) attention kernels, ``reference`` the definition;
- ``kernels``: fused RMSNorm (apex, torch) and fused AdamW, the model's RMSNorm the reference;
- ``fp8``: FP8 training of the LLM decoder's linears (torchao float8), the unconverted model the reference;
- ``compile``: ``torch.compile`` per transformer block, the eager model the reference;
- ``collectives``: tensor-in / tensor-out collectives under one name across torch versions.

Only ``device`` is imported here: the others are imported where a layout installs them
(``kernels`` pulls in DTensor, ``fp8`` torchao), so that importing the model stays cheap.
"""
from keyetron.backend.device import autocast, default_device, supports_bf16, synchronize  # noqa: F401
