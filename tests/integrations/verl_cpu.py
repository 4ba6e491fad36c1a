"""What verl 0.9.1's SFT trainer needs to run on a CPU-only machine: a test shim, not in the
package.

verl resolves its device through a platform registry that knows nvidia, npu and rocm only (it
falls back to nvidia, whose calls go to torch.cuda), and registers its FSDP engine for the
"cuda" and "npu" devices only. `install()` registers a CPU platform (device "cpu", gloo) and
selects it (set_platform; VERL_PLATFORM=cpu), and registers verl's own FSDPEngineWithLMHead
for the "cpu" device; `get_torch_device()` answers verl's memory and cache calls. The process
group is created by the caller with gloo (verl's run_sft would ask for "cpu:gloo,cpu:gloo").
Imported inside the verl venv only (tests/integrations/run_trainers.py).
"""

from __future__ import annotations

import contextlib
import os

import torch


class _CPUDevice:
    """verl's `get_torch_device()` on the CPU: torch.cpu, and 0 for the memory statistics and
    no-ops for the cache / synchronize calls it makes around each step (torch.cpu has none)."""

    def __getattr__(self, name):
        if hasattr(torch.cpu, name):
            return getattr(torch.cpu, name)
        if name == "mem_get_info":
            return lambda *args, **kwargs: (0, 0)
        if name == "get_device_name":  # verl's MFU estimate looks the name up
            return lambda *args, **kwargs: "CPU"
        return lambda *args, **kwargs: 0


def install() -> None:
    from verl.plugin.platform.platform_base import PlatformBase
    from verl.plugin.platform.platform_manager import PlatformRegistry, set_platform
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    @PlatformRegistry.register(platform="cpu")
    class PlatformCPU(PlatformBase):
        device_name = "cpu"
        vendor_name = "cpu"

        @property
        def device_module(self):
            return _CPUDevice()

        def is_available(self):
            return True

        def is_platform_available(self, use_smi_check=False):
            return True

        def current_device(self):
            return "cpu"  # verl moves tensors and the model `.to(get_device_id())`

        def device_count(self):
            return 1

        def set_device(self, device_index):
            pass

        def synchronize(self, device_index=None):
            pass

        def manual_seed(self, seed):
            torch.manual_seed(seed)

        def manual_seed_all(self, seed):
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings):
            pass

        def empty_cache(self):
            pass

        def get_device_capability(self, device_index=0):
            return None, None

        def communication_backend_name(self):
            return "gloo"

        def visible_devices_envvar(self):
            return "CPU_VISIBLE_DEVICES"

        def ray_resource_name(self):
            return "CPU"

        def ray_noset_envvars(self):
            return []

        def is_ipc_supported(self):
            return False

        @contextlib.contextmanager
        def nvtx_range(self, msg):
            yield

        def profiler_start(self):
            pass

        def profiler_stop(self):
            pass

        def cudart(self):
            return None

    os.environ["VERL_PLATFORM"] = "cpu"  # for processes verl starts
    set_platform(PlatformCPU())  # importing verl already resolved it (to nvidia)
    registry = EngineRegistry._engines["language_model"]
    for backend in ("fsdp", "fsdp2"):
        registry[backend].setdefault("cpu", FSDPEngineWithLMHead)
