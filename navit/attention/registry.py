"""The attention backend registry: every backend by name, with what it can do.

A backend class declares its :class:`~navit.attention.base.Capabilities` and is made known with
one line, ``register(MyBackend)``, inside navit or from a plug-in. Whatever needs a backend asks
here: the config's check of ``attn_backend``, the model's choice for each forward, ``auto``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from navit.attention.base import FLOAT_DTYPES, AttentionBackend, Capabilities, Situation


@dataclass(frozen=True)
class Entry:
    backend: type  # called with no arguments for a request by name
    auto: Callable[[Situation], AttentionBackend] | None  # what ``auto`` builds; None: ``backend()``


_ENTRIES: dict[str, Entry] = {}
_CLASSES: dict[str, type] = {}
BACKENDS: Mapping[str, type] = MappingProxyType(_CLASSES)  # name -> class, a live read-only view


def register(backend: type, auto: Callable[[Situation], AttentionBackend] | None = None) -> type:
    """Makes ``backend`` (a class with ``name``, ``capabilities``, ``prepare`` and ``attend``)
    known by its name to configs, to the model and to ``auto``. ``auto(situation)``, if given,
    builds the instance ``auto`` uses there, in place of ``backend()``. Returns the class, so it
    also serves as a class decorator; :func:`unregister` undoes it."""
    name = getattr(backend, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{backend!r} needs a class attribute name = '...' to be registered as an attention backend")
    if not isinstance(getattr(backend, "capabilities", None), Capabilities):
        raise TypeError(f"attention backend {name!r} must declare capabilities = navit.attention.Capabilities(...)")
    if name == "auto" or name in _ENTRIES:
        raise ValueError(f"attention backend name {name!r} is taken; unregister({name!r}) first to replace it")
    _ENTRIES[name] = Entry(backend, auto)
    _CLASSES[name] = backend
    return backend


def unregister(name: str) -> None:
    """Forgets the backend registered as ``name``."""
    _entry(name)
    del _ENTRIES[name], _CLASSES[name]


def names() -> list[str]:
    """Registered backend names, in registration order ('auto' is not one of them)."""
    return list(_ENTRIES)


def _entry(name: str) -> Entry:
    if name not in _ENTRIES:
        raise ValueError(f"unknown attention backend {name!r}; expected 'auto' or one of {names()}")
    return _ENTRIES[name]


def capabilities(name: str) -> Capabilities:
    # Read from the class on every use: what the class declares is what counts.
    return _entry(name).backend.capabilities


def fitting(situation: Situation) -> list[str]:
    """Backends that can run in ``situation``, in registration order."""
    return [name for name in _ENTRIES if capabilities(name).problem(situation) is None]


def auto_name(situation: Situation) -> str:
    """What ``auto`` picks: of the backends that fit, the one ranked highest on the device
    (the first registered among equals)."""
    device = situation.device.type
    best = None
    for name in fitting(situation):
        rank = capabilities(name).preference.get(device)
        if rank is not None and (best is None or rank > best[0]):
            best = (rank, name)
    if best is None:
        raise RuntimeError(
            f"attn_backend='auto' has no backend for {situation}; name one of {fitting(situation)}"
        )
    return best[1]


def choose(name: str, situation: Situation) -> AttentionBackend:
    """The backend for ``name`` ('auto' or a registered name) in ``situation``. A backend named
    that cannot run there raises a RuntimeError that names it, the situation, why, and the
    backends that would run."""
    if name == "auto":
        entry = _ENTRIES[auto_name(situation)]
        return entry.auto(situation) if entry.auto is not None else entry.backend()
    entry = _entry(name)
    problem = capabilities(name).problem(situation)
    if problem is not None:
        raise RuntimeError(
            f"attention backend {name!r} cannot run here ({situation}): {problem}; "
            f"use attn_backend='auto' or one of {fitting(situation)}"
        )
    return entry.backend()


def get_backend(name: str) -> AttentionBackend:
    """The backend registered as ``name``, with its default arguments (no situation check)."""
    return _entry(name).backend()


def available_backends(device: torch.device | str, dtype: torch.dtype | None = None, grad: bool = True) -> list[str]:
    """Backends that run on ``device`` (and train there, with ``grad``), in ``dtype`` or, when
    it is None, in some dtype they take (``varlen`` in fp16 / bf16 only)."""
    device = torch.device(device)
    dtypes = FLOAT_DTYPES if dtype is None else (dtype,)
    return [name for name in _ENTRIES
            if any(capabilities(name).problem(Situation(device, d, grad)) is None for d in dtypes)]  # fmt: skip
