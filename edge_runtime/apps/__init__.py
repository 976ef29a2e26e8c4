"""Applications built on the runtime's public API: push, status and offline validation."""
