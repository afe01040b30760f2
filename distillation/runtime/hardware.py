"""Processes, device, precision and distribution, decided here once for the whole program (Hugging Face Accelerate).

A run is one process, or several launched by torchrun or `accelerate launch` that hold whole copies of the models
(DDP) or shards of them (FSDP2). Without a GPU the processes train on CPUs and talk through gloo.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from distillation.settings.schema import Config, ConfigError


def start_processes(config: Config):
    """Join the other processes of a distributed launch (torchrun, accelerate launch), or run alone."""
    from accelerate import PartialState

    return PartialState(cpu=runs_on_cpu(config.hardware))


def end_processes(status: int) -> None:
    """End a process of a distributed launch once every process is done. The process exits here, skipping the
    interpreter's teardown: there, destroying DDP's reducer can wait forever on gloo's threads. (Records, logs and
    trackers are closed by then.)"""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def device_type(hardware) -> str:
    """The device the run computes on: cuda, mps or cpu."""
    if hardware.device != "auto":
        return hardware.device
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def runs_on_cpu(hardware) -> bool:
    return device_type(hardware) == "cpu"


def has_native_bf16(device: str) -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware: a CUDA GPU that supports it (Ampere and later),
    or a CPU with AMX or AVX-512 BF16 instructions (Intel Xeon from Sapphire Rapids and AMD from Zen 4 on, the AMX
    ones at about 3 times their float32 rate). Elsewhere bfloat16 is emulated and slower than float32."""
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device == "cpu":
        capabilities = torch.cpu.get_capabilities()
        return bool(capabilities.get("amx_bf16") or capabilities.get("avx512_bf16"))
    return False


def mixed_precision(config: Config) -> str:
    """`hardware.mixed_precision`, with auto decided: bf16 autocast where the device has native bfloat16, else no.
    Losses and softmaxes stay float32 either way (loss.py and chunked_loss.py compute them so)."""
    if config.hardware.mixed_precision != "auto":
        return config.hardware.mixed_precision
    return "bf16" if has_native_bf16(device_type(config.hardware)) else "no"


def teacher_dtype(config: Config) -> torch.dtype:
    """The teacher only runs forward passes, so a 16-bit copy halves its memory and time where the device has
    native bfloat16 (with `teacher.dtype: auto`)."""
    if config.teacher.dtype != "auto":
        return getattr(torch, config.teacher.dtype)
    return torch.bfloat16 if has_native_bf16(device_type(config.hardware)) else torch.float32


def fused_loss(accelerator) -> bool:
    """Whether loss.DistillationLoss runs fused (`Criterion.run_as(fused=...)`): always, but with FSDP, which keeps
    only a shard of the output head. Measured on CPUs from the demo's shape (vocabulary 2048, width 128) to GPT-2's
    (50257, 768), in float32 and bf16, it was faster at every one (bench/throughput.py, docs/benchmarks.md)."""
    return not accelerator.is_fsdp2


def build_accelerator(config: Config, run_directory: Path, trackers: list, projects_hidden_states: bool):
    """The Accelerator: device, mixed precision, the processes' distribution, and the trackers that receive the
    metrics. Nothing is written until the run directory is started."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, ProjectConfiguration, set_seed

    hardware = config.hardware
    if hardware.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("hardware.device is 'cuda' but no CUDA GPU is available; set hardware.device to auto or cpu.")
    if hardware.device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            "hardware.device is 'mps' but this machine has no MPS device; set hardware.device to auto or cpu."
        )
    if hardware.mixed_precision == "fp16" and device_type(hardware) != "cuda":
        raise ConfigError("hardware.mixed_precision fp16 needs a CUDA GPU; use bf16 or no on this machine.")
    sharding = fsdp_plugin(config, projects_hidden_states)
    precision = mixed_precision(config)
    accelerator = Accelerator(
        cpu=runs_on_cpu(hardware),
        mixed_precision=precision,
        fsdp_plugin=sharding,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(run_directory), logging_dir=str(run_directory)),
    )
    if sharding is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
        # Accelerate turns FSDP on for accelerator devices only; PyTorch's FSDP2 shards over gloo on CPUs as well.
        if precision != "no":  # as Accelerate does for GPUs
            sharding.set_mixed_precision(precision)
        accelerator.state.fsdp_plugin = sharding
        # Both shared states, as Accelerate sets them: a later AcceleratorState() copies the process state's type.
        accelerator.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    set_seed(config.seed)
    return accelerator


def fsdp_plugin(config: Config, projects_hidden_states: bool):
    """FSDP2 settings when `hardware.distributed` is fsdp (or `accelerate launch --use_fsdp` asked for it) and
    there are several processes; else None (DDP, or a single process)."""
    from accelerate import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin, parse_flag_from_env

    hardware = config.hardware
    asked = hardware.distributed == "fsdp" or parse_flag_from_env("ACCELERATE_USE_FSDP")
    if not asked or PartialState().num_processes == 1:
        return None
    if projects_hidden_states:
        raise ConfigError(
            "the chunked loss reads the output head's weight outside the forward pass, where FSDP keeps only a "
            "shard of it; use loss.DistillationLoss with hardware.distributed fsdp, or set it to ddp."
        )
    if hardware.fsdp_cpu_offload and runs_on_cpu(hardware):
        raise ConfigError(
            "hardware.fsdp_cpu_offload moves sharded weights out of GPU memory, and these processes run on CPUs; "
            "set it to false."
        )
    if hardware.compile:
        raise ConfigError(
            "hardware.compile is not supported with hardware.distributed fsdp yet; set compile to false, or "
            "distributed to ddp."
        )
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",  # one unit per block: the model's _no_split_modules
        reshard_after_forward=hardware.fsdp_reshard_after_forward,
        cpu_offload=hardware.fsdp_cpu_offload,
        state_dict_type="FULL_STATE_DICT",
    )


def prepare_models(accelerator, student: torch.nn.Module, teacher, optimizer, compile_models: bool):
    """The networks as the loop calls them, placed, wrapped (DDP or FSDP2) and compiled as configured:
    (student, optimizer, teacher or None). The data loaders stay the project's (batching.EpochBatches shards them)."""
    if compile_models:
        for network in (student, teacher):
            if network is not None:
                network.compile(dynamic=True)  # batches vary in length: one graph with a symbolic length
    prepared_student, prepared_optimizer = accelerator.prepare(student, optimizer)
    if teacher is None:
        return prepared_student, prepared_optimizer, None
    if accelerator.is_fsdp2:
        from accelerate.utils import fsdp2_prepare_model

        return prepared_student, prepared_optimizer, fsdp2_prepare_model(accelerator, teacher)  # sharded, in place
    return prepared_student, prepared_optimizer, accelerator.prepare_model(teacher, evaluation_mode=True)


def on_device(batch: dict, accelerator) -> dict:
    from accelerate.utils import send_to_device

    return send_to_device(batch, accelerator.device)


def distribution(accelerator) -> str:
    """How the processes held the models: none (one process), ddp (whole copies) or fsdp (sharded)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    return "ddp" if accelerator.num_processes > 1 else "none"


def peak_memory_mib(device: torch.device) -> float:
    """The peak memory so far: allocated tensors on a GPU; on a CPU, the process's peak resident size."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    import resource

    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)
