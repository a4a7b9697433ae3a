"""Moving weights between PyTorch and Flax, and portable checkpoints.

``torch_to_flax`` and ``flax_to_torch`` match slots by their canonical names
and convert each with the converter of its layer kind. Anything that cannot
be ported exactly raises an error naming the slot. ``save`` and ``load``
write and read one safetensors file that either backend can load.
"""

from terrace.port._checkpoint import load as load, save as save
from terrace.port._converters import (
    Converter as Converter,
    converters as converters,
    register_converter as register_converter,
)
from terrace.port._port import flax_to_torch as flax_to_torch, torch_to_flax as torch_to_flax

__all__ = ["Converter", "converters", "flax_to_torch", "load", "register_converter", "save", "torch_to_flax"]
