"""thermoscope: thermodynamic analysis of training checkpoint series."""

__version__ = "0.1.0"
