"""Run megatron-core 0.16 on CPU with gloo: the few CUDA assumptions it makes, redirected.

Switched on only when CUDA is absent (`enable_cpu_mode` refuses otherwise), so nothing here can
change a GPU run. Measured on megatron-core 0.16.1: with these redirections TP/PP/DP, the
DistributedOptimizer, the 1F1B and interleaved schedules, dist_checkpointing and the static
inference context run on CPU. What is redirected, and why:

* Tensor creation with ``device="cuda"`` or an integer device (the schedules' loss and token
  counters, p2p receive buffers, DDP grad buffers use ``torch.cuda.current_device()``): a
  `TorchFunctionMode` rewrites the ``device`` argument (and ``Tensor.to``'s device) to cpu.
* ``Tensor.cuda()`` / ``Module.cuda()``: identity (tensors and modules already live on cpu).
* ``Tensor.type()`` without arguments names CPU tensors as their CUDA twins
  ('torch.cuda.FloatTensor'): the distributed optimizer and grad clipping dispatch on those
  strings. Conversions given a 'torch.cuda.*' string convert to the CPU type.
* ``torch.cuda.current_device()`` -> 0 (feeds the device rewrite above);
  ``torch.cuda.synchronize()`` -> no-op.
* The CUDA RNG state behind ``megatron.core.tensor_parallel.random`` (the model-parallel RNG
  tracker used for initialisation, dropout and activation recomputation): get/set/seed act on the
  CPU default generator instead.

Models for CPU are built with ``use_cpu_initialization=True``, fp32, fusions off and the local
(non-Transformer-Engine) layer spec; see `papo_mega.models`.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

_log = logging.getLogger(__name__)
_CPU = torch.device("cpu")
_active_mode: _CpuDeviceMode | None = None
_saved: dict[str, object] = {}


def _to_cpu_device(device):
    """Map a CUDA device spec (``"cuda"``, ``"cuda:1"``, ``torch.device("cuda")``, ``0``) to cpu."""
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


class _CpuDeviceMode(TorchFunctionMode):
    """Rewrites device arguments that point at CUDA to cpu, for every torch call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        if func is torch.Tensor.type:
            return _tensor_type(*args, **kwargs)
        return func(*args, **kwargs)


def _tensor_type(tensor, dtype=None, *args, **kwargs):
    """``Tensor.type()`` as megatron reads it: the optimizer and grad clipping check for the
    strings 'torch.cuda.FloatTensor' etc., meaning "a float tensor on the accelerator"."""
    if dtype is None:
        name = torch.Tensor.type(tensor)
        return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
    if isinstance(dtype, str):
        dtype = dtype.replace("torch.cuda.", "torch.", 1)
    return torch.Tensor.type(tensor, dtype, *args, **kwargs)


def _install_cpu_rng_tracker() -> None:
    """Make megatron's model-parallel RNG tracker keep and swap CPU generator states."""
    from megatron.core.tensor_parallel import random as mp_random

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
        """The CUDA tracker's bookkeeping, with the CPU generator as the device generator."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            original = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)

        @contextlib.contextmanager
        def fork(self, name=mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            # Same contract as the CUDA tracker; its "CPU state changed" warning is dropped
            # because here the tracked generator *is* the CPU one.
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            original = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(original)

    for attr, value in (
        ("_get_cuda_rng_state", get_state),
        ("_set_cuda_rng_state", set_state),
        ("CudaRNGStatesTracker", CpuRNGStatesTracker),
    ):
        _saved.setdefault(f"random.{attr}", getattr(mp_random, attr))
        setattr(mp_random, attr, value)
    mp_random.initialize_rng_tracker(force_reset=True)


def is_cpu_mode() -> bool:
    """True while the CPU redirections are active in this process."""
    return _active_mode is not None


@contextlib.contextmanager
def device_mode_off():
    """Pop CPU mode's TorchFunctionMode for the block (its other redirections stay); for benchmarks.

    Only valid for code that never names a CUDA device, which is what the mode exists to rewrite
    (transformers, for one). A megatron training step qualifies once warm: megatron's rotary
    embedding moves its frequencies to `torch.cuda.current_device()` on the first forward per
    sequence length and caches the result, so a mode-on forward at the same length must come first.
    """
    mode = _active_mode
    mode.__exit__(None, None, None)
    try:
        yield
    finally:
        mode.__enter__()


def enable_cpu_mode() -> None:
    """Install the CUDA->CPU redirections. Idempotent; refuses when CUDA is available."""
    global _active_mode
    if _active_mode is not None:
        return
    if torch.cuda.is_available():
        raise RuntimeError("cpu mode must never be enabled on a machine with CUDA")
    _saved["Tensor.cuda"] = torch.Tensor.cuda
    _saved["Module.cuda"] = torch.nn.Module.cuda
    _saved["cuda.current_device"] = torch.cuda.current_device
    _saved["cuda.synchronize"] = torch.cuda.synchronize
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda *a, **k: None
    _install_cpu_rng_tracker()
    _active_mode = _CpuDeviceMode()
    _active_mode.__enter__()
    _log.debug("cpu mode enabled: CUDA device arguments, .cuda() and CUDA RNG go to cpu")


def disable_cpu_mode() -> None:
    """Undo `enable_cpu_mode` (used by tests that check the redirections are reversible)."""
    global _active_mode
    if _active_mode is None:
        return
    _active_mode.__exit__(None, None, None)
    _active_mode = None
    torch.Tensor.cuda = _saved.pop("Tensor.cuda")
    torch.nn.Module.cuda = _saved.pop("Module.cuda")
    torch.cuda.current_device = _saved.pop("cuda.current_device")
    torch.cuda.synchronize = _saved.pop("cuda.synchronize")
    from megatron.core.tensor_parallel import random as mp_random

    for key in [k for k in _saved if k.startswith("random.")]:
        setattr(mp_random, key.split(".", 1)[1], _saved.pop(key))
    mp_random.initialize_rng_tracker(force_reset=True)
