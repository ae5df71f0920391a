"""thermoscope: thermodynamic analysis of training checkpoint series."""
