"""`python -m train` on the fake npu (run it under torchrun with the fake torch_npu on PYTHONPATH), then write what the
NPU code path did to $NPU_REPORT/rank_<r>.json: the HCCL environment, whether the default group kept its device
binding, and every hccl group's timeouts in the order they were set (test_npu_paths.py reads it)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from train.__main__ import main


def _report() -> dict:
    import torch.distributed as dist

    from fake_npu import hccl

    return {
        "env": {key: os.environ.get(key) for key in ("HCCL_CONNECT_TIMEOUT", "HCCL_EXEC_TIMEOUT")},
        "bound_device_id": str(dist.group.WORLD.bound_device_id) if dist.is_initialized() else None,
        "group_timeouts": [[t.total_seconds() for t in group.timeouts] for group in hccl.groups()],
    }


if __name__ == "__main__":
    from launch.env import shutdown

    code = 1
    try:
        code = main(sys.argv[1:])
        if "NPU_REPORT" in os.environ:
            path = Path(os.environ["NPU_REPORT"]) / f"rank_{os.environ.get('RANK', '0')}.json"
            path.write_text(json.dumps({"code": code, **_report()}))
    except Exception:
        import traceback

        traceback.print_exc()  # before shutdown's os._exit, which would swallow it
    finally:
        shutdown(code, clean=code == 0)
