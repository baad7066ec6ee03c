"""hopkit: define, compile and export your own higher-order operators."""

from hopkit.base_hop import BaseHOP as BaseHOP
from hopkit.base_hop import FunctionWithNoFreeVars as FunctionWithNoFreeVars

__all__ = ["BaseHOP", "FunctionWithNoFreeVars"]
