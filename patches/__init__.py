"""STUB (owner: integration helper): one module per architecture family."""
