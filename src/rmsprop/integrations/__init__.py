"""Registrations of the optimizer in frameworks' own factories."""
