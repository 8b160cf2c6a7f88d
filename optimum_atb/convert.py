"""STUB (owner: integration helper): model.to_atb() / revert()."""


def to_atb(model, **kwargs):
    raise NotImplementedError


def revert(model):
    raise NotImplementedError
