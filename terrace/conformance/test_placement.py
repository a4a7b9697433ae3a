"""The device and dtype of layers that are made after the model was placed."""

from __future__ import annotations

from terrace.conformance._models import Regularized
from terrace.conformance._registry import case
from terrace.conformance._support import normal


@case("layers.Linear", "layers.BatchNorm1d", "layers.Dropout", "ops.relu")
def test_late_layers_follow_placement(terrace_adapter):
    """Weights made on the first pass get the adapter's device and the dtype set before that pass."""
    adapter = terrace_adapter
    for dtype in adapter.float_dtypes():
        built = adapter.build(Regularized())
        adapter.place(built, dtype)
        output = adapter.call(built, adapter.asarray(normal(4, 5), dtype=dtype))

        assert adapter.describe(output) == (dtype, adapter.device), f"output for {dtype}"
        arrays = adapter.parameters(built)
        assert arrays, "the first pass made no weights"
        for name, array in arrays.items():
            array_dtype, device = adapter.describe(array)
            assert device == adapter.device, f"{name} is on {device}, not {adapter.device}"
            if "float" in array_dtype:
                assert array_dtype == dtype, f"{name} is {array_dtype} after placing the model in {dtype}"
