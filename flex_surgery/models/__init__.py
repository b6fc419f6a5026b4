"""Models for tests, demos and benchmarks, built without downloads."""

from flex_surgery.models.tiny import TINY_ARCHITECTURES, example_inputs, tiny_hf_model

__all__ = ["TINY_ARCHITECTURES", "example_inputs", "tiny_hf_model"]
