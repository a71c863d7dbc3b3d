"""Pure quantizers: each scheme maps an array to a QArray and back."""

from jaxquant.schemes.rtn import IntScheme

__all__ = ["IntScheme"]
