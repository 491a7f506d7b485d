"""Run a recipe under FSDP on CPU processes: ``accelerate launch --config_file <fsdp yaml> tests/fsdp_cpu_launch.py
recipes/clip_student.py ...`` (with ``ACCELERATE_USE_CPU=1``).

accelerate turns FSDP on only for GPU-like distributed types (``AcceleratorState`` leaves a CPU job ``MULTI_CPU`` and
drops the FSDP plugin), although torch's FSDP2 (``fully_shard``) itself runs on CPU over gloo. This lifts exactly
that gate — a CPU job launched with an FSDP config becomes ``FSDP`` with the plugin accelerate built from the config
— so the rest of the path (accelerate's FSDP2 wrapping, Trainer, mmkd's trainer, the full-state-dict save) runs as
it does on GPUs. Test use only.
"""

import os
import runpy
import sys

import accelerate.state
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = accelerate.state.AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()


accelerate.state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
