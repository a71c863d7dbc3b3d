"""Quantization-aware training: fake quantization with straight-through gradients, LSQ, BitNet b1.58, fp8.

Design
------
* **One code path for QAT and export.** :func:`fake_quant` is ``scheme._dequantize(scheme._quantize(w))``
  wrapped in a ``jax.custom_vjp`` whose backward pass is the straight-through estimator (identity inside the
  scheme's representable range, zero where the weight saturates). The forward is therefore bit-identical to
  ``jq.dequantize(jq.quantize(w, scheme))``, and :func:`export_params` (= :func:`jaxquant.quantize_params`)
  freezes exactly the weights training saw.
* **Same rules as PTQ.** :func:`fake_quantize_params` takes the ``[(path_regex, scheme), ...]`` rules of
  :func:`jaxquant.quantize_params`; calling it on the float parameters inside the loss turns any float
  training step into QAT, with the optimizer holding float latent weights.
* **LSQ** (:mod:`.lsq`): learnable step sizes for symmetric int schemes, a separate ``{path: step}`` pytree
  trained with the weights; the forward uses the step as stored (scale dtype), so export is exact.
* **BitNet b1.58** (:mod:`.bitnet`): :class:`BitLinearTrain`, a module (RMSNorm -> per-token absmax int8
  activations -> ternary absmean weights, both with STE) that reuses the inference layer's quantizers
  (:class:`~jaxquant.TernaryScheme`, :func:`jaxquant.nn.layers.absmax_int8`) and exports to the packed
  :class:`jaxquant.nn.BitLinear`.
* **fp8 training** (:mod:`.fp8`): e4m3 forward / e5m2 gradients with delayed scaling (amax histories carried
  as "overwrite-with-gradient" state, the Flax/Transformer Engine trick).

Dependencies: core, schemes, transform and the nn layers; nothing here imports the CLI or the eval harness
(the trainer, :mod:`jaxquant.train`, sits above both).
"""

from jaxquant.qat.bitnet import (
    BLOCK_LINEARS,
    BitLinearTrain,
    bitnet_model,
    bitnet_optimizer,
    bitnet_schedules,
    export_bitnet,
)
from jaxquant.qat.fake_quant import STE_MODES, clip_mask, export_params, fake_quant, fake_quantize_params, freeze
from jaxquant.qat.fp8 import Fp8Meta, Fp8TrainLinear, fp8_dot, fp8_model
from jaxquant.qat.lsq import init_steps, lsq_fake_quant, lsq_quantize

__all__ = [
    "BLOCK_LINEARS",
    "STE_MODES",
    "BitLinearTrain",
    "Fp8Meta",
    "Fp8TrainLinear",
    "bitnet_model",
    "bitnet_optimizer",
    "bitnet_schedules",
    "clip_mask",
    "export_bitnet",
    "export_params",
    "fake_quant",
    "fake_quantize_params",
    "fp8_dot",
    "fp8_model",
    "freeze",
    "init_steps",
    "lsq_fake_quant",
    "lsq_quantize",
]
