"""Core data structures: QArray, formats, packing, validation."""
