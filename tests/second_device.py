"""A second device on a CPU-only machine, to test that helpers keep every tensor on the model's device.

On a GPU, an operation between a tensor on the GPU and one on the CPU fails ("Expected all tensors to be on the
same device"): a helper that forgets to move a batch breaks there, and nowhere else. This module makes that
failure happen on the CPU. Under ``SecondDevice()``:

* ``t.to(OTHER)``, ``model.to(OTHER)`` and factories given ``device=OTHER`` give ``Elsewhere`` tensors: they report
  ``OTHER`` (the ``meta`` device type) as their device, but hold real CPU data, so every value is computed
  exactly as on the CPU (``.item()``, ``int()``, ``.cpu()`` work and give the true numbers);
* an operation mixing an ``Elsewhere`` tensor with an ordinary CPU tensor of one or more dimensions raises
  ``RuntimeError``, except what CUDA allows too: 0-dimensional CPU tensors, and ``copy_`` (which is how
  ``load_state_dict`` and ``param.copy_(cpu_tensor)`` cross devices);
* ``.cpu()`` / ``.to("cpu")`` give an ordinary CPU tensor back.

It is the check that CUDA itself makes, with the same values as the CPU: so a test can both catch a missing
``.to(device)`` and compare every result with a plain CPU run.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

OTHER = torch.device("meta")


class Elsewhere(torch.Tensor):
    """A CPU tensor (``inner``) that says it lives on ``OTHER``."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> "Elsewhere":
        return torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), storage_offset=inner.storage_offset(), dtype=inner.dtype,
            device=OTHER, requires_grad=inner.requires_grad)

    def __init__(self, inner: torch.Tensor) -> None:
        self.inner = inner

    def __repr__(self) -> str:
        return f"Elsewhere({self.inner!r})"

    __torch_function__ = torch._C._disabled_torch_function_impl  # results come from __torch_dispatch__ as they are

    def tolist(self):  # a Python method that PyTorch refuses for subclasses; CUDA tensors have it
        return self.inner.tolist()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func}: an Elsewhere tensor is only usable under SecondDevice()")


def _unwrap(t):
    return t.inner if isinstance(t, Elsewhere) else t


def _wrap(t):
    return Elsewhere(t) if isinstance(t, torch.Tensor) and not isinstance(t, Elsewhere) else t


def _is_other(device) -> bool:
    return device is not None and torch.device(device).type == OTHER.type


class SecondDevice(TorchDispatchMode):
    """Every operation inside ``with SecondDevice():`` is checked for mixed devices; see the module docstring."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        elsewhere = any(isinstance(t, Elsewhere) for t in tensors)
        on_cpu = [t for t in tensors if not isinstance(t, Elsewhere) and t.dim() > 0]
        target = kwargs.get("device")
        if func is torch.ops.aten.copy_.default:  # copies cross devices on CUDA too
            func(*tree_map(_unwrap, args), **kwargs)
            return args[0]
        if func is torch.ops.aten._to_copy.default and target is not None:  # a move between devices
            kwargs["device"] = torch.device("cpu")
            out = func(_unwrap(args[0]), **kwargs)
            return Elsewhere(out) if _is_other(target) else out
        if elsewhere and on_cpu:
            shapes = [tuple(t.shape) for t in on_cpu]
            raise RuntimeError(f"Expected all tensors to be on the same device, but {func} got tensors on "
                               f"{OTHER} and CPU tensors of shapes {shapes}: a .to(device) is missing")
        creates = _is_other(target)
        if creates:
            kwargs["device"] = torch.device("cpu")
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        return tree_map(_wrap, out) if elsewhere or creates else out
