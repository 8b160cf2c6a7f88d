"""STUB (owner: paged-cache helper)."""


class PagedCache:
    pass


def register() -> None:
    pass
