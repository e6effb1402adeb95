"""The fused CPU kernel: its C++ sources (``csrc``), their build, and the loader and driver of the compiled extension."""
