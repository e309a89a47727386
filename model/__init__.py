"""twotower.model: the TwoTower denoiser built on megatron-core.

Importing this package (or any of its modules) changes nothing global. On a CPU-only host megatron
needs the CPU runtime layer: entry points call :func:`twotower.model.megatron_cpu.apply` explicitly
(and :func:`twotower.model.parallel_init.init_parallel` does too).
"""
