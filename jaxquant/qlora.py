"""QLoRA fine-tuning (Dettmers et al. 2023): a frozen quantized base (NF4 with double quantization by default)
plus trainable low-rank adapters, trained with AdamW on the calibration split.

Model: every linear layer of the transformer blocks becomes a :class:`~jaxquant.nn.QLinear` (the base,
quantized once, a :class:`~jaxquant.nn.QWeight`: never differentiated); those matching ``targets`` are wrapped in
a :class:`~jaxquant.nn.LoRA`, ``y = base(x) + (alpha / r) (x A) B`` with ``B = 0`` at the start, so the
adapted model starts exactly at the quantized model. Only ``A`` and ``B`` (``nnx.LoRAParam``) are trained;
embeddings and norms stay float and frozen.

Objective: next-token cross-entropy, mean over the ``T - 1`` predictions of each ``(B, T)`` window,
``L = -1/(B (T-1)) sum_{b,t} log softmax(f(x_b)_t)[x_{b,t+1}]``. Data: non-overlapping windows of ``seq_len``
tokens of the calibration split, reshuffled every epoch (``seed``). Optimizer: ``optax.adamw`` with a linear
warm-up and cosine decay to ``lr / 10``, gradients clipped to global norm 1. One step is one ``nnx.jit``
function (forward, backward, update).

Memory (:class:`WeightMemory`): base bytes (quantized block linears with their scales, plus the float
embedding and norms) + adapter bytes are the weights resident during training; the AdamW moments (2 x adapter)
are reported separately.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxquant.core.qarray import Scheme
from jaxquant.eval.memory import tree_nbytes
from jaxquant.eval.perplexity import make_windows, perplexity
from jaxquant.nn.layers import LoRA, QLinear, QWeight
from jaxquant.nn.swap import linear_paths, quantize_model
from jaxquant.schemes import NF4Scheme

__all__ = [
    "BLOCK_MODULES",
    "FinetuneResult",
    "QLoRAConfig",
    "WeightMemory",
    "finetune",
    "lm_loss",
    "qlora_model",
    "train_batches",
    "weight_memory",
]

#: the linear layers of the transformer blocks (module paths of :class:`jaxquant.models.Llama`)
BLOCK_MODULES = r"layers/\d+/(attn|mlp)/\w+_proj"


@dataclasses.dataclass(frozen=True)
class QLoRAConfig:
    """Settings of a QLoRA run.

    Attributes:
      scheme: base quantization (weight-only; default NF4, blocks of 64, double quantization).
      rank, alpha: LoRA rank and scale numerator (update scale ``alpha / rank``).
      targets: regex of the module paths that get adapters (default: all block linears, as in QLoRA).
      base: regex of the module paths quantized as the frozen base (default: all block linears).
      steps, lr, weight_decay, warmup_steps: AdamW schedule (warm-up, then cosine decay to ``lr / 10``).
      seq_len, batch_size: training windows per step.
      seed: adapter initialisation and data order.
      adapter_dtype: ``"float32"`` or ``"bfloat16"``.
    """

    scheme: Scheme = NF4Scheme(double_quant=True)  # noqa: RUF009 - a frozen, hashable dataclass
    rank: int = 8
    alpha: float = 16.0
    targets: str = BLOCK_MODULES
    base: str = BLOCK_MODULES
    steps: int = 100
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    seq_len: int = 256
    batch_size: int = 4
    seed: int = 0
    adapter_dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("rank", "steps", "seq_len", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"QLoRAConfig.{name} must be a positive int, got {v!r}")
        if self.seq_len < 2:
            raise ValueError(f"QLoRAConfig.seq_len must be at least 2, got {self.seq_len}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"QLoRAConfig.lr must be a positive number, got {self.lr!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"QLoRAConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"QLoRAConfig.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if not isinstance(self.scheme, Scheme):
            raise TypeError(f"QLoRAConfig.scheme must be a jaxquant Scheme, got {type(self.scheme).__name__}")
        if getattr(self.scheme, "_qdot", None) is not None:
            raise ValueError(
                f"QLoRA needs a weight-only base scheme (NF4, int RTN, fp8 weights...); {self.scheme.describe()} "
                "quantizes activations too, whose rounding has no gradient"
            )


@dataclasses.dataclass(frozen=True)
class WeightMemory:
    """Bytes of a QLoRA model's weights.

    Attributes:
      base_bytes: everything frozen: QArray kernels (codes + scales) and the float embedding/norms.
      adapter_bytes: the LoRA ``A``/``B`` matrices.
      optimizer_bytes: the optimizer state (AdamW: two moments per adapter value, plus a step count).
      float_bytes: what the same weights take in float32 (for comparison).
    """

    base_bytes: int
    adapter_bytes: int
    optimizer_bytes: int
    float_bytes: int

    @property
    def weight_bytes(self) -> int:
        """Peak weight memory: base + adapters."""
        return self.base_bytes + self.adapter_bytes


@dataclasses.dataclass(frozen=True)
class FinetuneResult:
    """What :func:`finetune` measured.

    Attributes:
      losses: training loss of every step (nats per token).
      ppl_before / ppl_after: evaluation perplexity of the quantized model before training (adapters at zero,
        i.e. the quantized base) and after (``nan`` when no evaluation tokens were given).
      memory: :class:`WeightMemory`.
      trainable_params: number of adapter values.
      train_seconds: wall time of the training loop (first step's compilation included).
      step_seconds: median wall time of a step after the first.
      tokens_seen: training tokens processed.
    """

    losses: tuple[float, ...]
    ppl_before: float
    ppl_after: float
    memory: WeightMemory
    trainable_params: int
    train_seconds: float
    step_seconds: float
    tokens_seen: int

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["losses"] = list(self.losses)
        d["memory"]["weight_bytes"] = self.memory.weight_bytes
        return d


def qlora_model(model: nnx.Module, config: QLoRAConfig = QLoRAConfig()) -> nnx.Module:
    """A copy of ``model`` with its ``config.base`` linears quantized (frozen :class:`QLinear`) and adapters on
    ``config.targets``; ``model`` is not modified.

    Raises:
      ValueError: a regex that matches no linear layer.
    """
    rngs = nnx.Rngs(config.seed)

    def adapted(m: Any) -> nnx.Module:
        return LoRA(
            QLinear.from_linear(m, config.scheme),
            rank=config.rank,
            alpha=config.alpha,
            rngs=rngs,
            dtype=config.adapter_dtype,
        )

    for name in ("targets", "base"):
        try:
            re.compile(getattr(config, name))
        except re.error as e:
            raise ValueError(f"qlora_model: invalid {name} regex {getattr(config, name)!r}: {e}") from None
    copy = nnx.clone(model)
    rules: list[tuple[str, Any]] = [(f"(?=(?:{config.base})$)(?:{config.targets})", adapted)]
    rules.append((config.base, config.scheme))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "rule matched nothing" is checked below, more precisely
        quantize_model(copy, rules)
    if not any(isinstance(m, LoRA) for _, m in nnx.iter_graph(copy)):
        paths = linear_paths(model)
        raise ValueError(
            f"qlora_model: no linear layer matches both targets={config.targets!r} and base={config.base!r}; "
            f"linear layer paths look like {paths[:2]}"
        )
    return copy


def train_batches(tokens: Any, seq_len: int, batch_size: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Endless ``(batch_size, seq_len)`` batches of non-overlapping windows of a token stream, in a new random
    order every epoch (``numpy.random.default_rng(seed)``).

    Raises:
      ValueError: fewer tokens than one batch needs.
    """
    windows = make_windows(np.asarray(tokens), seq_len)
    if windows.shape[0] < batch_size:
        raise ValueError(
            f"the training text has {windows.shape[0]} windows of {seq_len} tokens, fewer than batch_size="
            f"{batch_size}; use a longer text or smaller --seq-len/--batch-size"
        )
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(windows.shape[0])
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield windows[order[i : i + batch_size]]


def lm_loss(model: nnx.Module, batch: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (nats) of a ``(B, T)`` token batch, computed in float32."""
    logits = model(batch)[:, :-1].astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def weight_memory(model: nnx.Module, optimizer: Any = None) -> WeightMemory:
    """:class:`WeightMemory` of a QLoRA model (and its optimizer)."""
    from jaxquant.core.qarray import QArray

    base = nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Any(nnx.Param, QWeight), nnx.Not(nnx.LoRAParam))))
    adapters = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    opt = 0
    if optimizer is not None:
        opt = tree_nbytes(nnx.to_pure_dict(nnx.state(optimizer, nnx.Not(nnx.Param))))

    def float_bytes(x: Any) -> int:
        return 4 * math.prod(x.shape) if isinstance(x, QArray) or hasattr(x, "shape") else 0

    leaves = jax.tree.leaves((base, adapters), is_leaf=lambda x: isinstance(x, QArray))
    return WeightMemory(
        base_bytes=tree_nbytes(base),
        adapter_bytes=tree_nbytes(adapters),
        optimizer_bytes=opt,
        float_bytes=sum(float_bytes(x) for x in leaves),
    )


def _no_kernels() -> contextlib.AbstractContextManager:
    """Trace training steps on the XLA path (the Pallas matmul kernels define no gradients)."""
    from jaxquant import ops

    mode = getattr(ops, "kernel_mode", None)
    return mode("off") if mode is not None else contextlib.nullcontext()


def _eval_ppl(model: nnx.Module, tokens: Any, seq_len: int, max_windows: int | None, batch_size: int, progress: bool):
    graphdef, state = nnx.split(model)

    def logits(state: Any, toks: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state)(toks)

    return perplexity(
        logits,
        tokens=tokens,
        params=state,
        seq_len=seq_len,
        max_windows=max_windows,
        batch_size=batch_size,
        progress=progress,
    ).ppl


def finetune(
    qmodel: nnx.Module,
    train_tokens: Any,
    config: QLoRAConfig = QLoRAConfig(),
    *,
    eval_tokens: Any = None,
    eval_seq_len: int = 512,
    eval_windows: int | None = 16,
    eval_batch_size: int = 4,
    progress: bool = True,
    log_every: int = 0,
) -> FinetuneResult:
    """Train the adapters of a :func:`qlora_model` **in place** on ``train_tokens`` for ``config.steps`` steps.

    Args:
      qmodel: a model with :class:`~jaxquant.nn.LoRA` layers (``nnx.LoRAParam``); nothing else is trained.
      train_tokens: 1-D token ids (the calibration split).
      config: :class:`QLoRAConfig` (its ``steps``, ``lr``, ``seq_len``, ``batch_size``... are used here).
      eval_tokens: 1-D token ids for perplexity before and after (``None``: skipped).
      eval_seq_len, eval_windows, eval_batch_size: the evaluation protocol (first ``eval_windows`` windows).
      progress: a tqdm bar with the running loss.
      log_every: also print ``step loss`` every N steps to stderr (0: never).

    Raises:
      ValueError: the model has no adapters, or the text is too short.
    """
    from tqdm.auto import tqdm

    n_train = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(qmodel, nnx.LoRAParam)))
    if n_train == 0:
        raise ValueError("finetune: the model has no LoRA adapters (build it with qlora_model)")
    batches = train_batches(train_tokens, config.seq_len, config.batch_size, config.seed)
    warm = min(config.warmup_steps, max(config.steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warm else config.lr,
        peak_value=config.lr,
        warmup_steps=warm,
        decay_steps=max(config.steps, warm + 1),
        end_value=config.lr / 10,
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=config.weight_decay))
    optimizer = nnx.Optimizer(qmodel, tx, wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model: nnx.Module, opt: nnx.Optimizer, batch: jax.Array) -> jax.Array:
        loss, grads = nnx.value_and_grad(lm_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, batch)
        opt.update(model, grads)
        return loss

    ppl_before = float("nan")
    if eval_tokens is not None:
        ppl_before = _eval_ppl(qmodel, eval_tokens, eval_seq_len, eval_windows, eval_batch_size, progress)
    losses: list[float] = []
    times: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(total=config.steps, unit="step", desc="qlora", disable=not progress, file=sys.stderr)
    try:
        with _no_kernels():
            for i in range(config.steps):
                ts = time.perf_counter()
                loss = float(step(qmodel, optimizer, jnp.asarray(next(batches))))
                times.append(time.perf_counter() - ts)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"finetune: the loss became {loss} at step {i + 1}; lower --lr")
                losses.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
                if log_every and (i + 1) % log_every == 0:
                    print(f"step {i + 1:>5}  loss {loss:.4f}", file=sys.stderr, flush=True)
    finally:
        bar.close()
    train_seconds = time.perf_counter() - t0
    ppl_after = float("nan")
    if eval_tokens is not None:
        ppl_after = _eval_ppl(qmodel, eval_tokens, eval_seq_len, eval_windows, eval_batch_size, progress)
    return FinetuneResult(
        losses=tuple(losses),
        ppl_before=ppl_before,
        ppl_after=ppl_after,
        memory=weight_memory(qmodel, optimizer),
        trainable_params=int(n_train),
        train_seconds=train_seconds,
        step_seconds=float(np.median(times[1:])) if len(times) > 1 else float(times[0]),
        tokens_seen=config.steps * config.batch_size * config.seq_len,
    )
