"""The speculative decoder's exception."""

from ..errors import OptimumAtbError


class SpeculativeDecodingError(OptimumAtbError, ValueError):
    """A speculative `generate()` request that cannot run (incompatible draft, unsupported option...)."""
