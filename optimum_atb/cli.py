"""STUB: the optimum-atb command."""


def main(argv=None) -> int:
    return 0
