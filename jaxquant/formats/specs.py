"""SPECs of the GGUF formats (registered in :data:`jaxquant.specs._EXTENSIONS`).

* ``q8_0``, ``q4_0``, ``q4_k_s``, ``q4_k_m``, ``q5_k_m``, ``q6_k``, ``q2_k``, ``q3_k_m``, ``tq2_0`` (and the
  other :data:`~jaxquant.formats.gguf_recipes.RECIPES`): llama.cpp's per-tensor recipe applied to every
  tensor ``llama-quantize`` quantizes -- the block linears *and* the token embedding (which is also the
  output head of a tied model) -- with llama.cpp's fallbacks for row lengths that are not a multiple of the
  block (see :mod:`jaxquant.formats.gguf_recipes`). Norms stay float32.
* ``gguf-<type>`` (``gguf-q4_k``, ``gguf-q8_0``...): one block type for all block linears, like
  ``llama-quantize --pure`` restricted to the linears; raises if a tensor's rows do not fit the block.
"""

from __future__ import annotations

from typing import Any

from jaxquant.formats.gguf_blocks import GGUF_TYPES, GGUFScheme
from jaxquant.formats.gguf_recipes import RECIPES, recipe_rules
from jaxquant.specs import BLOCK_LINEARS, Spec

__all__ = ["SPECS", "apply_recipe", "parse"]

#: recipes listed by ``jaxquant schemes`` (every name of RECIPES parses)
LISTED = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_k_s", "q4_0", "q3_k_m", "q2_k", "tq2_0")


def apply_recipe(recipe: str, model: Any) -> dict[str, Any]:
    """Quantize ``model`` (a :class:`jaxquant.models.Llama`) with llama.cpp's ``recipe``; returns the parameter
    dict (QArrays of :class:`GGUFScheme` in place of the quantized tensors)."""
    from jaxquant.models import model_params
    from jaxquant.transform import quantize_params

    return quantize_params(model_params(model), recipe_rules(recipe, model.config), strict=True)


def _recipe_spec(name: str) -> Spec:
    r = RECIPES[name]

    def build(model: Any, calib_tokens: Any = None, options: dict | None = None) -> dict[str, Any]:
        del calib_tokens, options  # a recipe needs no calibration
        return apply_recipe(name, model)

    return Spec(name, r.description + " (llama.cpp recipe, embedding included)", build=build)


SPECS: dict[str, Spec] = {name: _recipe_spec(name) for name in LISTED}


def parse(name: str) -> Spec | None:
    """Any recipe name, or ``gguf-<type>`` for one block type on all block linears; ``None`` otherwise."""
    key = name.strip().lower()
    if key in RECIPES:
        return _recipe_spec(key)
    if key.startswith("gguf-") and key[5:].upper() in GGUF_TYPES:
        qtype = key[5:].upper()
        return Spec(key, f"GGUF {qtype} blocks on every block linear", ((BLOCK_LINEARS, GGUFScheme(qtype)),))
    return None
