"""Stage index: discover checkpoint series (local or remote), read safetensors headers,
optimizer state, training logs and architecture, and validate every input."""
