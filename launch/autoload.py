"""Keep `import torch` from loading device backends by itself, so that a broken accelerator stack cannot stop a run
that does not use it.

Since torch 2.5, `import torch` loads every installed `torch.backends` entry point unless TORCH_DEVICE_BACKEND_AUTOLOAD
is 0; torch_npu registers one, and with CANN missing or broken (no libhccl.so, say) `import torch` itself then fails
("Failed to load the backend extension: torch_npu"), `device=cpu` included. The entry points call this before they
import torch; launch/device.py then imports torch_npu itself when `device=npu` (or `auto`) asks for it, and says in
one line why it could not. A user who wants torch's autoloading sets the variable to 1 and it is left alone.
This module imports nothing that imports torch.
"""

from __future__ import annotations

import os

AUTOLOAD_VARIABLE = "TORCH_DEVICE_BACKEND_AUTOLOAD"


def defer_device_backends() -> None:
    """Call before the first `import torch` of the process (it has no effect after)."""
    os.environ.setdefault(AUTOLOAD_VARIABLE, "0")
