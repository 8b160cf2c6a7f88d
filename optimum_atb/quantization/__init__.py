"""STUB (owner: quantization helper)."""


class AtbQuantConfig:
    pass


def quantize(model, **kwargs):
    raise NotImplementedError


def load_gguf(*args, **kwargs):
    raise NotImplementedError


def register() -> None:
    pass
