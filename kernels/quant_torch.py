"""STUB: replaced by its owner."""
