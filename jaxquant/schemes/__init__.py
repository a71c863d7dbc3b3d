"""Pure quantizers: each scheme maps an array to a QArray and back."""

from jaxquant.schemes.cast import CastScheme
from jaxquant.schemes.fp8 import FP8Scheme
from jaxquant.schemes.llm_int8 import LLMInt8Scheme
from jaxquant.schemes.nf4 import NF4Scheme
from jaxquant.schemes.rtn import IntScheme
from jaxquant.schemes.ternary import TernaryScheme

__all__ = ["CastScheme", "FP8Scheme", "IntScheme", "LLMInt8Scheme", "NF4Scheme", "TernaryScheme"]
