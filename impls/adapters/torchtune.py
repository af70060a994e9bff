"""Adapter around torchtune's ``RotaryPositionalEmbeddings`` and ``Llama3ScaledRoPE``.

How torchtune is loaded: ``import torchtune`` runs the package's ``__init__``, which imports
torchao and fails without it (torchtune 0.6.1 also breaks with torchao 0.18, where
``torchao.dtypes.nf4tensor`` moved). The two RoPE files import only ``math``, ``typing`` and
torch, so this module finds the installed package directory with
``importlib.util.find_spec("torchtune").submodule_search_locations`` (which does not execute the
package) and executes just those files with ``importlib.util.spec_from_file_location``:

* ``torchtune/modules/position_embeddings.py``: ``RotaryPositionalEmbeddings``.
* ``torchtune/models/llama3_1/_position_embeddings.py``: ``Llama3ScaledRoPE`` (llama3 scaling).

``pip install --no-deps torchtune==0.6.1`` is therefore enough next to torch.

What torchtune's modules can express, and how the adapter maps the suite's cases onto them:

* Pairing: interleaved only (adjacent features ``2i, 2i + 1``).
* Positions: ``forward(x, input_pos=positions)`` gathers rows of a cos/sin table of
  ``max_seq_len`` positions built at construction. The table is never extended, so the adapter
  builds each module with ``max_seq_len = max(positions) + 1``. A negative position would index
  the table from its end, so negative positions are not supported.
* Partial rotary: none in torchtune. The adapter rotates ``x[..., :rotary_dim]`` with a module
  of ``dim=rotary_dim`` and passes the remaining features through.
* Arithmetic: ``x.float()`` times the float32 table, cast back to the input dtype once.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
from types import ModuleType

import numpy as np
import torch

from impls.adapters.base import Adapter, RopeSpec, Support
from impls.adapters.torch_util import from_torch, to_torch

POSITION_EMBEDDINGS_FILE = os.path.join("modules", "position_embeddings.py")
LLAMA3_1_POSITION_EMBEDDINGS_FILE = os.path.join("models", "llama3_1", "_position_embeddings.py")

_LLAMA3_ARGUMENTS = ("scale_factor", "low_freq_factor", "high_freq_factor", "old_context_len")


@functools.cache
def load_torchtune_file(relative_path: str) -> ModuleType:
    """Execute one file of the installed torchtune package without its ``__init__``.

    Raises:
        ModuleNotFoundError: torchtune is not installed.
        ImportError: the file is missing from the installed torchtune.
    """
    package = importlib.util.find_spec("torchtune")
    if package is None or not package.submodule_search_locations:
        raise ModuleNotFoundError(
            "torchtune is not installed; run pip install --no-deps torchtune==0.6.1.", name="torchtune"
        )

    for directory in package.submodule_search_locations:
        path = os.path.join(directory, relative_path)
        if os.path.isfile(path):
            break
    else:
        raise ImportError(
            f"torchtune at {list(package.submodule_search_locations)} has no {relative_path}; "
            f"this adapter was written against torchtune 0.6.1."
        )

    # A private module name, so the partial load never replaces the real torchtune modules.
    module_name = "_rope_parity_torchtune_" + relative_path.replace(os.sep, "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rotary_positional_embeddings_class() -> type[torch.nn.Module]:
    """Return torchtune's ``RotaryPositionalEmbeddings`` class."""
    return load_torchtune_file(POSITION_EMBEDDINGS_FILE).RotaryPositionalEmbeddings


def llama3_scaled_rope_class() -> type[torch.nn.Module]:
    """Return torchtune's ``Llama3ScaledRoPE`` class, checking it takes the llama3 parameters."""
    scaled_rope = load_torchtune_file(LLAMA3_1_POSITION_EMBEDDINGS_FILE).Llama3ScaledRoPE
    parameters = inspect.signature(scaled_rope.__init__).parameters
    missing = [name for name in _LLAMA3_ARGUMENTS if name not in parameters]
    if missing:
        raise ImportError(f"torchtune's Llama3ScaledRoPE takes no {missing} arguments.")
    return scaled_rope


# Import-time check: both files load, so a broken install shows as an unavailable adapter.
rotary_positional_embeddings_class()
llama3_scaled_rope_class()


class TorchtuneAdapter(Adapter):
    """``RotaryPositionalEmbeddings(dim, max_seq_len, base)`` or ``Llama3ScaledRoPE`` with ``input_pos``."""

    name = "torchtune"
    library = "torchtune"
    support = Support(
        pairings=frozenset({"interleaved"}),
        positions="non_negative",
        partial_rotary=True,  # by slicing: the module gets only the rotated features
        scaling_types=frozenset({"default", "llama3"}),
    )

    def _module(self, spec: RopeSpec, rotary_dim: int, max_seq_len: int) -> torch.nn.Module:
        if spec.scaling.rope_type == "llama3":
            params = spec.scaling.params
            return llama3_scaled_rope_class()(
                rotary_dim,
                max_seq_len=max_seq_len,
                base=spec.theta,
                scale_factor=params["factor"],
                low_freq_factor=params["low_freq_factor"],
                high_freq_factor=params["high_freq_factor"],
                old_context_len=params["original_max_position_embeddings"],
            )
        return rotary_positional_embeddings_class()(rotary_dim, max_seq_len=max_seq_len, base=spec.theta)

    def rotate(self, x: np.ndarray, positions: np.ndarray, spec: RopeSpec, *, mode: str = "eager") -> np.ndarray:
        rotary_dim = spec.rotary_dim or x.shape[-1]
        # Table rows 0 .. max(positions): torchtune never extends its table.
        rope = self._module(spec, rotary_dim, max_seq_len=int(positions.max()) + 1)

        x_torch = to_torch(x)
        input_pos = torch.from_numpy(np.asarray(positions, np.int64))
        with torch.no_grad():
            rotated = rope(x_torch[..., :rotary_dim], input_pos=input_pos)
        out = torch.cat((rotated, x_torch[..., rotary_dim:]), dim=-1)
        return from_torch(out)
