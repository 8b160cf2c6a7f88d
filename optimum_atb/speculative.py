"""STUB (owner: speculative helper)."""


def draft_from(model, **kwargs):
    raise NotImplementedError


def attach(model) -> None:
    pass


def detach(model) -> None:
    pass
