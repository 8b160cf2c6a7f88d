"""STUB (owner: integration helper): registration with transformers."""


def register() -> None:
    pass
