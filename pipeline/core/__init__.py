"""Shared foundations: errors, atomic writes, the manifest, refusal reasons, progress."""
