"""Formats users bring and expect: llama.cpp's GGUF (block schemes, recipes, reader, writer) and Hugging Face
GPTQ / AWQ checkpoints.

* :mod:`.gguf_blocks` -- ``GGUFScheme("Q4_K")`` etc.: GGUF block types as jaxquant schemes (QArray data = the
  GGUF bytes); quantization byte-identical to llama.cpp's reference quantizers, dequantization equal to gguf-py.
* :mod:`.gguf_recipes` -- llama.cpp's per-tensor recipes (``q4_k_m``...) with its shape fallbacks.
* :mod:`.gguf_writer` / :mod:`.gguf_reader` -- complete llama GGUF files out, GGUF tensors in as QArrays.
* :mod:`.hf_gptq` / :mod:`.hf_awq` -- HF GPTQ v1 and AWQ GEMM tensors and checkpoint folders, both ways.
* :mod:`.inspect` -- the table behind ``jaxquant inspect``.
* :mod:`.specs` -- the SPECs (``q4_k_m``, ``gguf-q8_0``...) registered with :func:`jaxquant.specs.parse_spec`.
"""

from jaxquant.formats.gguf_blocks import GGUF_TYPES, GGUFScheme
from jaxquant.formats.gguf_reader import load_gguf_quantized, load_gguf_quantized_model, read_gguf_tensors
from jaxquant.formats.gguf_recipes import RECIPES, recipe_rules, recipe_types
from jaxquant.formats.gguf_writer import write_gguf, write_gguf_model
from jaxquant.formats.hf_awq import from_awq, load_awq_checkpoint, save_awq_checkpoint, to_awq
from jaxquant.formats.hf_gptq import (
    GroupIndexScheme,
    from_gptq,
    load_gptq_checkpoint,
    save_gptq_checkpoint,
    to_gptq,
)
from jaxquant.formats.inspect import inspect_path

__all__ = [
    "GGUF_TYPES",
    "RECIPES",
    "GGUFScheme",
    "GroupIndexScheme",
    "from_awq",
    "from_gptq",
    "inspect_path",
    "load_awq_checkpoint",
    "load_gguf_quantized",
    "load_gguf_quantized_model",
    "load_gptq_checkpoint",
    "read_gguf_tensors",
    "recipe_rules",
    "recipe_types",
    "save_awq_checkpoint",
    "save_gptq_checkpoint",
    "to_awq",
    "to_gptq",
    "write_gguf",
    "write_gguf_model",
]
