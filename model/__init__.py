"""twotower.model: the TwoTower denoiser built on megatron-core.

Importing this package installs the CPU runtime layer (:mod:`twotower.model.megatron_cpu`) before any
megatron module is imported; on CUDA machines only the megatron bug fixes are applied.
"""

from twotower.model import megatron_cpu as _megatron_cpu

_megatron_cpu.apply()
