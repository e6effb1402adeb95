"""Backends: the code that runs a step, and the choice of one per parameter group."""
