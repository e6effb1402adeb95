"""The core: the optimizer class, the update rule on torch tensors, presets, validation and the NumPy reference."""
