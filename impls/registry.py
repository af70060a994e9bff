"""The list of adapters the parity suite runs, loaded lazily so a missing framework only skips.

To add an implementation, write one :class:`impls.adapters.base.Adapter` subclass and add a
line to :data:`ADAPTERS`: its name, ``module:class``, and the top-level modules it imports.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from impls.adapters.base import Adapter


@dataclass(frozen=True)
class AdapterEntry:
    """The location of an adapter class and the optional modules it needs."""

    name: str
    target: str
    requires: tuple[str, ...]
    framework: str


ADAPTERS: tuple[AdapterEntry, ...] = (
    AdapterEntry("flax_nnx", "impls.adapters.flax_nnx:FlaxNNXAdapter", ("jax", "flax"), "jax"),
    AdapterEntry("flax_nnx_cached", "impls.adapters.flax_nnx:FlaxNNXCachedAdapter", ("jax", "flax"), "jax"),
    AdapterEntry("equinox", "impls.adapters.equinox:EquinoxAdapter", ("jax", "equinox"), "jax"),
    AdapterEntry("torch_onnx", "impls.adapters.torch_onnx:TorchOnnxAdapter", ("torch",), "torch"),
    AdapterEntry("torch_hf_formula", "impls.adapters.torch_hf_formula:TorchHFFormulaAdapter", ("torch",), "torch"),
    AdapterEntry("hf_llama", "impls.adapters.hf:HFLlamaAdapter", ("torch", "transformers"), "torch"),
    AdapterEntry("hf_gpt_neox", "impls.adapters.hf:HFGPTNeoXAdapter", ("torch", "transformers"), "torch"),
    AdapterEntry("torchtune", "impls.adapters.torchtune:TorchtuneAdapter", ("torch", "torchtune"), "torch"),
    AdapterEntry(
        "lucidrains", "impls.adapters.lucidrains:LucidrainsAdapter", ("torch", "rotary_embedding_torch"), "torch"
    ),
)


class AdapterUnavailable(RuntimeError):
    """An adapter whose optional framework is not installed."""


def missing_requirement(entry: AdapterEntry) -> str | None:
    """Return why ``entry`` cannot load (a missing module), or None."""
    for module in entry.requires:
        if importlib.util.find_spec(module) is None:
            return f"{entry.name} needs the {module!r} package, which is not installed"
    return None


def entry(name: str) -> AdapterEntry:
    """Return the registry entry called ``name``."""
    for candidate in ADAPTERS:
        if candidate.name == name:
            return candidate
    names = ", ".join(e.name for e in ADAPTERS)
    raise KeyError(f"Unknown adapter {name!r}. Registered adapters: {names}.")


def load_adapter(name: str) -> Adapter:
    """Import and instantiate the adapter ``name``; raise AdapterUnavailable when it cannot load."""
    found = entry(name)
    reason = missing_requirement(found)
    if reason:
        raise AdapterUnavailable(reason)
    module_name, class_name = found.target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise AdapterUnavailable(f"{name} failed to import: {error}") from error
    return getattr(module, class_name)()
