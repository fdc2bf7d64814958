"""Where and how the code runs: device and dtype choice, torchrun processes, the default weights.

Used by every command (track, evaluate, train, bench, app); nothing here tracks or trains.
Errors talk about values ("unknown device 'gpu'"); the commands name their own flags.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lorat.errors import LoratError, WeightsError
from lorat.files import bundled_weights

if TYPE_CHECKING:
    import torch

__all__ = ["resolve_device", "resolve_dtype", "cpu_has_bf16", "cpu_has_fp16", "BF16_MIN_WIDTH", "set_threads",
           "synchronize", "peak_rss_mb", "dtype_name", "cast_for_autocast", "Distributed", "default_weights",
           "default_weights_notice"]

WEIGHTS_VARIABLE = "LORAT_WEIGHTS"
_DTYPES = {"float32": None, "fp32": None, "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16",
           "bf16": "bfloat16"}  # names of torch dtypes: torch is imported when needed, not with this module


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def resolve_device(device: str | torch.device | None, types: tuple[str, ...] = ("cpu", "cuda", "mps")
                   ) -> torch.device:
    """``"auto"``/None -> CUDA if present, then MPS, else CPU; otherwise as given, checked to exist here.

    Args:
        types: the device types the caller supports (training: cpu and cuda).

    Raises:
        LoratError: not a device name, a type outside ``types``, or a device this machine lacks.
    """
    import torch

    names = ", ".join(["auto", *(t + (", cuda:N" if t == "cuda" else "") for t in types)])
    if device is None or str(device) == "auto":
        if torch.cuda.is_available() and "cuda" in types:
            return torch.device("cuda")
        if _mps_available() and "mps" in types:
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise LoratError(f"unknown device {str(device)!r}; use {names}") from None
    if dev.type not in types:
        raise LoratError(f"unsupported device {str(device)!r}; use {names}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LoratError(f"device {str(device)!r} requested but CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise LoratError(f"device {str(device)!r} does not exist: this machine has {count} CUDA device(s) "
                             f"(cuda:0 to cuda:{count - 1})")
    if dev.type == "mps" and not _mps_available():
        raise LoratError(f"device {str(device)!r} requested but MPS is not available on this machine "
                         "(it needs Apple silicon and a PyTorch build with MPS)")
    return dev


# Narrowest network whose float32 -> bfloat16 switch pays on a CPU with native bfloat16 (measured on
# an AVX-512 BF16 / AMX EPYC, 2 threads: embed 192 (demo) 12.3 -> 12.5 ms, 384 (S-224) 64 -> 36 ms,
# 768 (B-224) 212 -> 116 ms). Narrower networks keep float32: no gain, and rounding moves the boxes.
BF16_MIN_WIDTH = 384


def cpu_has_bf16() -> bool:
    """Native bfloat16 arithmetic on this CPU (AVX-512 BF16 or AMX), as torch detects it."""
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def cpu_has_fp16() -> bool:
    """Native float16 arithmetic on this CPU (AMX-FP16 or AVX-512 FP16), as torch detects it."""
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_fp16_supported", "_is_avx512_fp16_supported")]
    return any(check() for check in checks if check is not None)


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA); nothing elsewhere. For timing."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: Linux's VmHWM (of this program only), else ru_maxrss
    (which Linux carries over from the parent process across exec)."""
    import resource

    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    scale = 2**20 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale, 1)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, width: int | None = None
                  ) -> torch.dtype | None:
    """Autocast dtype; None means float32.

    ``"auto"``/None: float16 on CUDA (the official inference); on a CPU with native bfloat16
    (:func:`cpu_has_bf16`) bfloat16 for networks of ``width`` (embedding size) at least
    :data:`BF16_MIN_WIDTH` (the DINOv2 variants: about 2x faster); float32 otherwise.

    Raises:
        LoratError: an unknown name, or float16 on the CPU.
    """
    import torch

    if isinstance(dtype, torch.dtype):
        return None if dtype == torch.float32 else dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.float16
        if device.type == "cpu" and width is not None and width >= BF16_MIN_WIDTH and cpu_has_bf16():
            return torch.bfloat16
        return None
    if dtype not in _DTYPES:
        raise LoratError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16")
    if _DTYPES[dtype] == "float16" and device.type == "cpu":
        raise LoratError("float16 autocast is not supported on the CPU; use float32 or bfloat16")
    return None if _DTYPES[dtype] is None else getattr(torch, _DTYPES[dtype])


def cast_for_autocast(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """Store the weights and biases of every Linear and Conv2d layer in ``dtype``, in place.

    Autocast casts them to ``dtype`` at every forward pass anyway (it caches casts only for
    tensors that need gradients), so the outputs are bit-identical while each pass skips reading
    the float32 weights and writing the copies: B-224 on a 2-core AVX-512 BF16 CPU goes from 117
    to 66 ms. Only for a model that runs under ``dtype`` autocast from now on; None does nothing.
    """
    import torch

    if dtype is None or dtype == torch.float32:
        return model
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            for param in module.parameters(recurse=False):
                param.data = param.data.to(dtype)
    return model


def set_threads(threads: int | str | None) -> None:
    """Use ``threads`` CPU threads for torch and ONNX Runtime; None or ``"auto"``: start on one per core
    (one where other programs hold cores) and let tracking loops choose from measured step times
    (:mod:`lorat.tracking.threads`), so that a busy machine does not stall them. The outputs are the
    same on any thread count (tested), so this choice changes speed only.

    Raises:
        LoratError: fewer than one thread, or a word other than ``auto``.
    """
    from lorat.tracking.threads import TUNER

    if threads is None or threads == "auto":
        TUNER.enable()
        return
    if isinstance(threads, str):
        raise LoratError(f"the number of threads must be a number or 'auto', got {threads!r}")
    if threads < 1:
        raise LoratError(f"the number of threads must be at least 1, got {threads}")
    import torch

    TUNER.disable()
    torch.set_num_threads(threads)


def dtype_name(dtype: torch.dtype | None) -> str:
    """``None`` -> ``"float32"``, ``torch.float16`` -> ``"float16"``."""
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


class Distributed:
    """This process's place in a torchrun job (or a job of one): rank, world size, its device.

    Under torchrun on CUDA each process takes ``cuda:LOCAL_RANK``; the process group is NCCL on
    CUDA and Gloo on the CPU. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, device: str | torch.device | None = "auto", types: tuple[str, ...] = ("cpu", "cuda", "mps")):
        import torch
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = resolve_device(device, types)
        if self.device.type == "cuda":
            if self.world > 1:
                self.device = resolve_device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}", types)
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        """True on rank 0, which alone prints, writes shared files and reads run folders."""
        return self.rank == 0

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over all processes."""
        import torch.distributed as dist

        if self.world > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world
        return value

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.world > 1:
            dist.barrier()

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank."""
        if self.world == 1:
            return flag
        import torch
        import torch.distributed as dist

        value = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(value, 0)
        return bool(value.item())

    def close(self) -> None:
        import torch.distributed as dist

        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> Distributed:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def __getattr__(name: str):
    if name == "DEFAULT_WEIGHTS":  # the bundled demo model (weights/README.md); LORAT_WEIGHTS overrides it
        return bundled_weights()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_weights() -> Path:
    """The weights used when none are given: ``$LORAT_WEIGHTS`` or the bundled demo model.

    Raises:
        WeightsError: neither exists.
    """
    env = os.environ.get(WEIGHTS_VARIABLE)
    path = Path(env) if env else bundled_weights()
    if not path.is_file():
        where = WEIGHTS_VARIABLE if env else "the bundled demo model"
        raise WeightsError(f"no weights given and {where} {path} is missing (see weights/README.md)",
                           missing="weights")
    return path


def default_weights_notice(path: Path) -> str:
    """The line a command prints when :func:`default_weights` chose ``path``."""
    if os.environ.get(WEIGHTS_VARIABLE):
        return f"using {WEIGHTS_VARIABLE}={path}"
    return f"using the bundled demo model {path} (a small model, not the paper's; see README)"
