"""CPU emulation of CUDA's device rules: catch host tensors in device-side math and collectives.

On CPU every tensor lives on cpu, so code that builds a reduction buffer on the host and hands
it to a collective, or adds a device loss into a host accumulator, passes here and fails only
on a GPU. Two facts of the GPU path are emulated:

* CUDA's same-device rule: an op whose tensor operands sit on different devices raises
  "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and
  cpu!"; 0-dim CPU tensors are the exception (passed to the kernel as scalars), and copies
  (``Tensor.to``, ``copy_``) and indexing with host indices are allowed across devices.
* NCCL takes device tensors only: torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp,
  ``check_gpu_single_tensor``: ``if (!tensor.is_cuda() || tensor.is_sparse()) throw
  "Tensors must be CUDA and dense"``.

`device_tagging` tags each tensor as *device* or *host* (a Python attribute on the tensor
object) with a `TorchFunctionMode` that sees every torch call: the model's parameters, buffers
and gradient buffers start as device tensors; a factory given a CUDA device (``"cuda"``,
``torch.device("cuda", 0)``, an integer, as megatron's ``torch.cuda.current_device()``) or
``.to``/``.cuda()`` onto one yields a device tensor; a factory without a device, ``"cpu"`` or
``.cpu()`` yields a host tensor; every other op's outputs take the place of its inputs. Ops that
mix a device tensor with a non-scalar host tensor raise as CUDA does, and the torch.distributed
collectives reject host tensors as NCCL does. Tensors made outside the mode (C++ autograd
results, anything created before it) are untagged and accepted everywhere: the emulation only
flags tensors it knows are on the host, so it can miss a mix but never invents one.

The code under test must name the device by `ParallelGroups.device`; `emulated_groups(groups)`
returns the CPU groups with ``device=cuda:0``, a device the CPU mode
(`papo_mega.distributed.cpu_mode`) rewrites to cpu at every call. This mode must therefore be
entered *after* the CPU mode, so it sees the device argument before the CPU mode rewrites it
(`init_distributed` enables the CPU mode; `device_tagging` checks). `cpu_mode.device_mode_off`
must not be used inside the block: it pops the innermost mode, which would then be this one.

    groups = emulated_groups(init_distributed(layout))
    with device_tagging(chunks) as tags:
        forward_backward(chunks, split_microbatches(batch, groups, 2), groups)
    tags.moved_bytes  # host-to-device bytes copied inside the block
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d
from torch.overrides import TorchFunctionMode

from papo_mega.distributed.cpu_mode import is_cpu_mode

DEVICE = "device"
HOST = "host"
_TAG = "_papo_place"
EMULATED_DEVICE = torch.device("cuda", 0)

# torch.distributed entry points the project and megatron call (patched by attribute name in the
# torch.distributed namespace; object collectives keep the originals, as NCCL moves their
# pickles to the current device itself). isend/irecv are patched in distributed_c10d too:
# P2POp and batch_isend_irecv compare the op against those module globals.
_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce",
                "reduce_scatter", "reduce_scatter_tensor", "all_to_all_single", "send", "recv")
_P2P = ("isend", "irecv")

# Cross-device by design on CUDA: copies and indexing with host indices.
_CROSS_DEVICE_OK = {torch.Tensor.to, torch.Tensor.copy_, torch.Tensor.cpu, torch.Tensor.type_as,
                    torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.data.__set__}
_TRANSFERS = {torch.Tensor.to, torch.Tensor.type_as}
# Reading a device tensor's values on the host waits for the GPU: a host sync.
_HOST_READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__,
               torch.Tensor.__float__, torch.Tensor.__index__}
_DEVICE_GETTER = torch.Tensor.device.__get__  # a fresh method-wrapper per access: compare with ==


def place_of(tensor: torch.Tensor) -> str | None:
    """DEVICE, HOST, or None for a tensor the mode has not seen made."""
    return getattr(tensor, _TAG, None)


def set_place(tensor: torch.Tensor, place: str | None) -> None:
    if place is not None:
        setattr(tensor, _TAG, place)


def emulated_groups(groups):
    """The same groups with `device` set to cuda:0 (rewritten to cpu by the CPU mode)."""
    return dataclasses.replace(groups, device=EMULATED_DEVICE)


def _place_of_device(device) -> str | None:
    if device is None:
        return HOST  # torch's default device
    if isinstance(device, int) and not isinstance(device, bool):
        return DEVICE  # megatron's torch.cuda.current_device()
    if isinstance(device, str | torch.device):
        kind = torch.device(device).type
        return HOST if kind == "cpu" else DEVICE if kind == "cuda" else None
    return None


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, list | tuple):
        return [t for item in tree for t in _tensors(item)]
    if isinstance(tree, dict):
        return [t for item in tree.values() for t in _tensors(item)]
    return []


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _to_target(args: tuple, kwargs: dict) -> str | None:
    """Where ``Tensor.to(...)`` puts its result: a device, another tensor's place, or unchanged."""
    if "device" in kwargs:
        return _place_of_device(kwargs["device"])
    for arg in args[1:]:
        if isinstance(arg, torch.Tensor):
            return place_of(arg)
        if isinstance(arg, str | torch.device | int) and not isinstance(arg, bool):
            return _place_of_device(arg)
    return None


def _mix_error(func, device: torch.Tensor, host: torch.Tensor) -> RuntimeError:
    name = getattr(func, "__name__", str(func))
    return RuntimeError(
        f"Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu! "
        f"(device-tagging emulation: {name} got a device tensor {tuple(device.shape)} and a host tensor "
        f"{tuple(host.shape)}; create the host one on groups.device)"
    )


def _check_same_device(func, inputs: list[torch.Tensor]) -> None:
    on_device = next((t for t in inputs if place_of(t) == DEVICE), None)
    if on_device is None:
        return
    host = next((t for t in inputs if place_of(t) == HOST and t.dim() > 0), None)
    if host is not None:
        raise _mix_error(func, on_device, host)


class DeviceTaggingMode(TorchFunctionMode):
    """Tags results device/host and raises on a device/host mix (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.moved_bytes = 0
        """Bytes of host tensors copied to the device (``.to``/``.cuda()``/``copy_`` into a device tensor)."""
        self.host_syncs = 0
        """Reads of a device tensor's values on the host (``tolist``, ``item``, ``bool``/``int``/``float``):
        each waits for the GPU to finish the work queued so far."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == _DEVICE_GETTER and place_of(args[0]) == DEVICE:
            return EMULATED_DEVICE  # code that allocates "next to" a device tensor names cuda, as on a GPU
        inputs = _tensors((args, kwargs))
        if func in _HOST_READS and place_of(args[0]) == DEVICE:
            self.host_syncs += 1
        if func not in _CROSS_DEVICE_OK:
            _check_same_device(func, inputs)
        target = self._target(func, args, kwargs, inputs)
        self._count_transfer(func, args, target)
        out = func(*args, **kwargs)
        return self._tag_outputs(out, inputs, target)

    @staticmethod
    def _target(func, args: tuple, kwargs: dict, inputs: list[torch.Tensor]) -> str | None:
        """An explicit placement of the result, or None to inherit the inputs' place."""
        if func in _TRANSFERS:
            return _to_target(args, kwargs)
        if func is torch.Tensor.cpu:
            return HOST
        if "device" in kwargs:
            return _place_of_device(kwargs["device"])
        return HOST if not inputs else None  # a factory without a device: torch's default, cpu

    def _count_transfer(self, func, args: tuple, target: str | None) -> None:
        # Known host tensors only: untagged ones (made before the mode, e.g. megatron's rotary
        # frequencies, moved once and cached) may already be on the device on a GPU.
        if target == DEVICE and func in _TRANSFERS and place_of(args[0]) == HOST:
            self.moved_bytes += _nbytes(args[0])
        elif func is torch.Tensor.copy_ and place_of(args[0]) == DEVICE and place_of(args[1]) == HOST:
            self.moved_bytes += _nbytes(args[1])

    @staticmethod
    def _tag_outputs(out, inputs: list[torch.Tensor], target: str | None):
        places = {place_of(t) for t in inputs}
        inherited = DEVICE if DEVICE in places else HOST if HOST in places else None
        place = target or inherited
        if isinstance(out, torch.Tensor):
            return _placed(out, inputs, place, target)
        if isinstance(out, list | tuple) and not hasattr(out, "_fields"):
            return type(out)(_placed(o, inputs, place, target) if isinstance(o, torch.Tensor) else o for o in out)
        return out


def _placed(out: torch.Tensor, inputs: list[torch.Tensor], place: str | None, target: str | None) -> torch.Tensor:
    """Tag `out`; a move that returned its own input (CPU mode's ``.to(cuda)`` is the identity)
    gets a fresh alias, so the source keeps its own place as on a GPU, where it is a copy."""
    if any(out is t for t in inputs):
        if target is None or place_of(out) == target:
            return out  # in-place ops and no-op conversions keep the tensor's place
        out = out.view_as(out)
    set_place(out, place)
    return out


def tag_modules_on_device(modules: Iterable[torch.nn.Module]) -> None:
    """Mark modules' parameters, buffers and megatron DDP gradient buffers as device tensors."""
    for module in modules:
        params = list(module.parameters())
        tensors = [*params, *(b for _, b in module.named_buffers())]
        tensors += [p.main_grad for p in params if getattr(p, "main_grad", None) is not None]
        # megatron's DDP keeps its _ParamAndGradBuffer list as `buffers`, shadowing Module.buffers().
        for buffer in module.__dict__.get("buffers", []):
            tensors += [t for t in (getattr(buffer, "grad_data", None), getattr(buffer, "param_data", None))
                        if t is not None]
        # Plain tensor attributes are module state megatron puts on the device too (on CUDA, where
        # use_cpu_initialization is off): e.g. RotaryEmbedding.inv_freq, made with
        # device=torch.cuda.current_device() and not registered as a buffer.
        for sub in module.modules():
            tensors += [v for v in vars(sub).values() if isinstance(v, torch.Tensor)]
        for tensor in tensors:
            set_place(tensor, DEVICE)


def _reject_host_tensors(name: str, original):
    @functools.wraps(original)
    def collective(*args, **kwargs):
        tensors = _tensors((args, kwargs)) + [getattr(a, "tensor", None) for a in _p2p_ops(args)]
        for tensor in tensors:
            if tensor is not None and place_of(tensor) == HOST:
                raise ValueError(f"Tensors must be CUDA and dense (device-tagging emulation of NCCL: "
                                 f"torch.distributed.{name} got a host tensor {tuple(tensor.shape)})")
        return original(*args, **kwargs)

    return collective


def _p2p_ops(args: tuple) -> list:
    first = args[0] if args else None
    return [op for op in first if isinstance(op, dist.P2POp)] if isinstance(first, list) else []


@contextlib.contextmanager
def _nccl_collectives() -> Iterator[None]:
    saved = {}
    for name in (*_COLLECTIVES, *_P2P, "batch_isend_irecv"):
        saved[(dist, name)] = getattr(dist, name)
    for name in _P2P:
        saved[(distributed_c10d, name)] = getattr(distributed_c10d, name)
    wrapped = {name: _reject_host_tensors(name, getattr(dist, name)) for name in (*_COLLECTIVES, *_P2P, "batch_isend_irecv")}
    try:
        for module, name in saved:
            setattr(module, name, wrapped[name])
        yield
    finally:
        for (module, name), original in saved.items():
            setattr(module, name, original)


@contextlib.contextmanager
def _tensor_cuda_tags() -> Iterator[None]:
    """``Tensor.cuda()`` (the identity in CPU mode) returns a device-tagged alias."""
    saved = torch.Tensor.cuda

    def cuda(self, *args, **kwargs):
        return self if place_of(self) == DEVICE else self.to(EMULATED_DEVICE)

    torch.Tensor.cuda = cuda
    try:
        yield
    finally:
        torch.Tensor.cuda = saved


@contextlib.contextmanager
def device_tagging(modules: Iterable[torch.nn.Module] = ()) -> Iterator[DeviceTaggingMode]:
    """Emulate CUDA's device rules and NCCL's device-only collectives for the block (CPU mode only)."""
    if not is_cpu_mode():
        raise RuntimeError("device_tagging emulates a GPU on CPU: call init_distributed (CPU mode) first")
    tag_modules_on_device(modules)
    with _nccl_collectives(), _tensor_cuda_tags(), DeviceTaggingMode() as mode:
        yield mode
