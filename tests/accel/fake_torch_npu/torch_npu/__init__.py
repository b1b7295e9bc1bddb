"""A stand-in for torch_npu on a machine without Ascend hardware: importing it installs the fake npu device
(tests/accel/fake_npu), as importing the real torch_npu installs Ascend's, so that `python -m train device=npu` runs
the harness's real NPU code path. Put this folder and tests/accel on PYTHONPATH; FAKE_NPU_SOC picks the chip the
device reports, FAKE_NPU_DEVICES (default: torchrun's LOCAL_WORLD_SIZE, else 1) how many devices it has."""

import os

from fake_npu import install

install(int(os.environ.get("FAKE_NPU_DEVICES", os.environ.get("LOCAL_WORLD_SIZE", "1"))))
