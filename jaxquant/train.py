"""A small, jit-compiled trainer for the Llama model: float, QAT (any scheme, optional LSQ), BitNet b1.58, fp8.

Model: :class:`jaxquant.models.Llama` from a :class:`~jaxquant.models.LlamaConfig` (:func:`tiny_config` has
presets by non-embedding parameter count). Tokenizer: bytes (:class:`ByteTokenizer`, vocabulary 256): no
training, no out-of-vocabulary text, and ppl per byte comparable across runs; token budgets are in bytes.

Modes (``TrainConfig.mode``):

* ``"float"``: plain float32 training.
* ``"qat"``: the block linear kernels go through :func:`jaxquant.qat.fake_quantize_params` with
  ``qat_scheme`` inside the loss (LSQ steps trained alongside with ``lsq=True``); :meth:`Trainer.export` gives
  the real QArrays (:func:`jaxquant.qat.export_params`).
* ``"bitnet"``: the block linears are :class:`jaxquant.qat.BitLinearTrain` (W1.58A8 with STE), optimizer
  :func:`jaxquant.qat.bitnet_optimizer` (two-stage lr / weight-decay recipe); :meth:`Trainer.export` gives packed
  :class:`jaxquant.nn.BitLinear` layers.
* ``"fp8"``: the block linears are :class:`jaxquant.qat.fp8.Fp8TrainLinear` (e4m3 forward, e5m2 gradients,
  delayed scaling; the amax histories are overwritten with their "gradients").

Objective: next-token cross-entropy (nats per byte), mean over the ``T - 1`` predictions of each window. Data:
the batch of step ``i`` is ``batch_size`` random windows of ``seq_len`` bytes of the training stream at offsets
drawn from ``numpy.random.default_rng([seed, i])``: a pure function of the step,
so a resumed run sees exactly the batches an uninterrupted one would. Optimizer (float/qat/fp8): AdamW with
linear warm-up and cosine decay to ``lr / 10``, gradients clipped to global norm 1, weight decay on matrices
only. One step = one ``jax.jit`` function (forward, backward, update) over plain pytrees.

Evaluation: mean NLL per byte over the first ``eval_windows`` non-overlapping windows of ``seq_len`` bytes of the
evaluation stream (predictions 2..T of each window), and ``ppl = exp(NLL)``.

Checkpoints (:meth:`Trainer.save` / :meth:`Trainer.restore`): the whole training state (parameters, LSQ steps,
fp8 histories, optimizer state, step) as an orbax checkpoint written to a temporary folder and renamed into
place (atomic), plus ``trainer.json`` (the config); with ``checkpoint_every`` the trainer writes
``DIR/step_N`` and :meth:`Trainer.restore_latest` resumes. Restoring gives a bit-identical continuation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxquant.core.qarray import Scheme
from jaxquant.models.llama import Llama, LlamaConfig
from jaxquant.qat.bitnet import BLOCK_LINEARS, bitnet_model, bitnet_optimizer, export_bitnet
from jaxquant.qat.fake_quant import export_params, fake_quantize_params
from jaxquant.qat.fp8 import Fp8Meta, fp8_model
from jaxquant.qat.lsq import init_steps

__all__ = [
    "MODES",
    "TINY_SIZES",
    "ByteTokenizer",
    "TrainConfig",
    "Trainer",
    "non_embedding_params",
    "tiny_config",
]

MODES = ("float", "qat", "bitnet", "fp8")

#: presets: name -> (dim, n_layers, n_heads, hidden_dim); about 0.5 M, 2 M and 8 M non-embedding parameters
TINY_SIZES: dict[str, tuple[int, int, int, int]] = {
    "0.1M": (64, 2, 4, 192),
    "0.5M": (128, 3, 4, 320),
    "2M": (192, 5, 6, 544),
    "8M": (320, 7, 8, 896),
}

#: QAT rule target: the block linear kernels, in ``nnx.State`` paths (``.../kernel/value``)
QAT_KERNELS = BLOCK_LINEARS + r"/kernel(/value)?"


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256)."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        """``text`` -> ``uint8``-valued int32 token ids."""
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids: Any) -> str:
        """Token ids -> text (invalid UTF-8 sequences replaced)."""
        return bytes(np.asarray(ids, np.uint8).tolist()).decode("utf-8", errors="replace")


def tiny_config(size: str = "0.5M", vocab_size: int = 256, max_seq_len: int = 256) -> LlamaConfig:
    """A small Llama config from :data:`TINY_SIZES` (tied embeddings, GQA with 2 query heads per kv head when
    the head count allows)."""
    if size not in TINY_SIZES:
        raise ValueError(f"unknown size {size!r}; known: {sorted(TINY_SIZES)}")
    dim, layers, heads, hidden = TINY_SIZES[size]
    kv = heads // 2 if heads % 2 == 0 else heads
    return LlamaConfig(
        vocab_size=vocab_size,
        dim=dim,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=kv,
        hidden_dim=hidden,
        tie_embeddings=True,
        max_seq_len=max_seq_len,
    )


def non_embedding_params(c: LlamaConfig) -> int:
    """Parameters of the transformer blocks and the final norm (what scaling studies count)."""
    head = 0 if c.tie_embeddings else c.dim * c.vocab_size
    return c.num_params() - c.vocab_size * c.dim - head


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of a training run.

    Attributes:
      model: the Llama hyper-parameters.
      mode: ``"float"``, ``"qat"``, ``"bitnet"`` or ``"fp8"`` (see the module docstring).
      qat_scheme: the scheme of ``mode="qat"`` (block linear kernels).
      lsq: train LSQ step sizes too (``mode="qat"`` with a symmetric IntScheme).
      steps, batch_size, seq_len: the token budget is ``steps * batch_size * seq_len``.
      lr, weight_decay, warmup_steps: optimizer (BitNet: the peak of its two-stage schedule).
      seed: initialisation and data order.
      eval_windows: evaluation windows of ``seq_len``.
      fp8_history: amax history length of ``mode="fp8"``.
    """

    model: LlamaConfig
    mode: str = "float"
    qat_scheme: Scheme | None = None
    lsq: bool = False
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    seed: int = 0
    eval_windows: int = 32
    fp8_history: int = 16

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"TrainConfig.mode must be one of {MODES}, got {self.mode!r}")
        for name in ("steps", "batch_size", "seq_len", "eval_windows", "fp8_history"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {v!r}")
        if self.seq_len < 2:
            raise ValueError("TrainConfig.seq_len must be at least 2")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be a positive number, got {self.lr!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if self.mode == "qat" and not isinstance(self.qat_scheme, Scheme):
            raise ValueError("TrainConfig: mode='qat' needs qat_scheme (a jaxquant Scheme)")
        if self.lsq and self.mode != "qat":
            raise ValueError("TrainConfig: lsq=True needs mode='qat'")

    @property
    def tokens(self) -> int:
        """Training token (byte) budget."""
        return self.steps * self.batch_size * self.seq_len

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = dataclasses.asdict(self.model)
        d["qat_scheme"] = None if self.qat_scheme is None else repr(self.qat_scheme)
        return d


_COMPILED: dict[TrainConfig, tuple[Any, Any]] = {}


def _matrices(tree: Any) -> Any:
    return jax.tree.map(lambda x: getattr(x, "ndim", 0) >= 2, tree)


def _optimizer(c: TrainConfig) -> optax.GradientTransformation:
    if c.mode == "bitnet":
        return bitnet_optimizer(c.lr, c.steps, warmup_steps=c.warmup_steps, weight_decay=c.weight_decay)
    warm = min(c.warmup_steps, max(c.steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warm else c.lr,
        peak_value=c.lr,
        warmup_steps=warm,
        decay_steps=max(c.steps, warm + 1),
        end_value=c.lr / 10,
    )
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=c.weight_decay, mask=_matrices),
    )


def _nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), tokens[:, 1:])


class Trainer:
    """Train a Llama model on a token stream (see the module docstring).

    Args:
      config: :class:`TrainConfig`.
      train_tokens: 1-D token ids (the calibration split as bytes).
      eval_tokens: 1-D token ids for :meth:`evaluate` (optional).
      model: start from this (float, e.g. pretrained) model instead of a random initialisation; its config must
        be ``config.model``. Restoring a checkpoint of such a run needs the same ``model`` (its structure).
    """

    def __init__(self, config: TrainConfig, train_tokens: Any, eval_tokens: Any = None, *, model: Llama | None = None):
        self.config = c = config
        if model is not None and getattr(model, "config", None) != c.model:
            raise ValueError("Trainer: model.config differs from config.model")
        self.train_tokens = np.asarray(train_tokens, np.int32).reshape(-1)
        if self.train_tokens.size < c.seq_len + 1:
            raise ValueError(f"the training stream has {self.train_tokens.size} tokens, fewer than seq_len + 1")
        if self.train_tokens.size and int(self.train_tokens.max()) >= c.model.vocab_size:
            raise ValueError("training tokens exceed the model's vocabulary")
        self.eval_tokens = None if eval_tokens is None else np.asarray(eval_tokens, np.int32).reshape(-1)
        if model is None:
            model = Llama(c.model, rngs=nnx.Rngs(c.seed))
        if c.mode == "bitnet":
            model = bitnet_model(model)
        elif c.mode == "fp8":
            model = fp8_model(model, history=c.fp8_history)
        self.graphdef, params, meta, self._rest = nnx.split(model, nnx.Param, Fp8Meta, ...)
        self.rules = [(QAT_KERNELS, c.qat_scheme)] if c.mode == "qat" else []
        steps = init_steps(params, self.rules) if c.lsq else {}
        self.tx = _optimizer(c)
        self.state: dict[str, Any] = {
            "params": params,
            "lsq_steps": steps,
            "fp8_meta": meta,
            "opt": self.tx.init((params, steps)),
            "step": jnp.zeros((), jnp.int32),
        }
        # compiled once per config (the graph, rules and optimizer are functions of it): trainers of the same
        # config (a resumed run, a comparison) share the compiled step
        fns = _COMPILED.get(c)
        if fns is None:
            fns = _COMPILED[c] = (jax.jit(self._train_step, donate_argnums=0), jax.jit(self._eval_nll))
        self._step_fn, self._eval_fn = fns
        self.history: list[tuple[int, float]] = []

    # -- the pure functions --------------------------------------------------------------------------
    def _model(self, params: Any, steps: Any, meta: Any) -> nnx.Module:
        if self.rules:
            params = fake_quantize_params(params, self.rules, steps=steps, warn_unused=False)
        return nnx.merge(self.graphdef, params, meta, self._rest)

    def _loss(self, params: Any, steps: Any, meta: Any, batch: jax.Array) -> jax.Array:
        return _nll(self._model(params, steps, meta)(batch), batch).mean()

    def _train_step(self, state: dict[str, Any], batch: jax.Array) -> tuple[dict[str, Any], jax.Array]:
        loss, (gp, gs, gm) = jax.value_and_grad(self._loss, argnums=(0, 1, 2))(
            state["params"], state["lsq_steps"], state["fp8_meta"], batch
        )
        updates, opt = self.tx.update((gp, gs), state["opt"], (state["params"], state["lsq_steps"]))
        params, steps = optax.apply_updates((state["params"], state["lsq_steps"]), updates)
        # fp8 amax histories: overwrite with their "gradients" (the updated histories, see jaxquant.qat.fp8)
        new = {"params": params, "lsq_steps": steps, "fp8_meta": gm, "opt": opt, "step": state["step"] + 1}
        return new, loss

    def _eval_nll(self, state: dict[str, Any], windows: jax.Array) -> jax.Array:
        model = self._model(state["params"], state["lsq_steps"], state["fp8_meta"])
        return _nll(model(windows), windows).sum(axis=1)

    # -- data ----------------------------------------------------------------------------------------
    def batch(self, step: int) -> np.ndarray:
        """The ``(batch_size, seq_len)`` training batch of step ``step`` (a pure function of seed and step)."""
        c = self.config
        rng = np.random.default_rng([c.seed, step])
        starts = rng.integers(0, self.train_tokens.size - c.seq_len + 1, size=c.batch_size)
        return np.stack([self.train_tokens[s : s + c.seq_len] for s in starts])

    # -- public API ----------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Steps done so far."""
        return int(self.state["step"])

    def train_step(self) -> float:
        """One optimizer step on :meth:`batch` of the current step; returns the training loss."""
        i = self.step
        self.state, loss = self._step_fn(self.state, jnp.asarray(self.batch(i)))
        loss = float(loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"the training loss became {loss} at step {i + 1}; lower the learning rate")
        self.history.append((i + 1, loss))
        return loss

    def run(
        self,
        steps: int | None = None,
        *,
        progress: bool = True,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        checkpoint_every: int = 0,
        log_every: int = 0,
    ) -> list[tuple[int, float]]:
        """Train until ``steps`` (default ``config.steps``) steps are done in all; returns ``[(step, loss)]`` of
        this call. With ``checkpoint_every`` and ``checkpoint_dir``, saves ``checkpoint_dir/step_N`` every N steps
        and at the end."""
        from tqdm.auto import tqdm

        total = self.config.steps if steps is None else steps
        out: list[tuple[int, float]] = []
        bar = tqdm(total=total, initial=self.step, unit="step", desc=self.config.mode, disable=not progress)
        try:
            while self.step < total:
                loss = self.train_step()
                out.append((self.step, loss))
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
                if log_every and self.step % log_every == 0:
                    print(f"step {self.step:>6}  loss {loss:.4f}", file=sys.stderr, flush=True)
                if checkpoint_dir is not None and checkpoint_every and self.step % checkpoint_every == 0:
                    self.save(Path(checkpoint_dir) / f"step_{self.step}")
        finally:
            bar.close()
        if checkpoint_dir is not None and checkpoint_every and self.step % checkpoint_every:
            self.save(Path(checkpoint_dir) / f"step_{self.step}")
        return out

    def evaluate(self, eval_tokens: Any = None, *, windows: int | None = None, batch_size: int = 8) -> dict[str, float]:
        """``{"nll": nats per token, "ppl": exp(nll), "tokens": predictions}`` on the evaluation stream: the first
        ``windows`` (default ``config.eval_windows``) non-overlapping windows of ``seq_len`` tokens."""
        toks = self.eval_tokens if eval_tokens is None else np.asarray(eval_tokens, np.int32).reshape(-1)
        if toks is None:
            raise ValueError("evaluate: no evaluation tokens (pass eval_tokens)")
        c = self.config
        n = min(toks.size // c.seq_len, windows or c.eval_windows)
        if n < 1:
            raise ValueError(f"evaluate: the evaluation stream is shorter than one window of {c.seq_len} tokens")
        w = toks[: n * c.seq_len].reshape(n, c.seq_len)
        total = 0.0
        for i in range(0, n, batch_size):
            chunk = w[i : i + batch_size]
            real = chunk.shape[0]
            if real < batch_size:  # one fixed batch shape, one compilation; padded rows are dropped
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - real, axis=0)])
            total += float(np.asarray(self._eval_fn(self.state, jnp.asarray(chunk)))[:real].sum())
        count = n * (c.seq_len - 1)
        nll = total / count
        return {"nll": nll, "ppl": math.exp(nll), "tokens": count}

    def model(self) -> nnx.Module:
        """The model as trained (QAT: with fake-quantized kernels; BitNet: BitLinearTrain layers)."""
        s = self.state
        return self._model(s["params"], s["lsq_steps"], s["fp8_meta"])

    def float_model(self) -> nnx.Module:
        """The model with the float latent weights (no fake quantization)."""
        return nnx.merge(self.graphdef, self.state["params"], self.state["fp8_meta"], self._rest)

    def export(self, packing: str = "2bit") -> nnx.Module:
        """The deployable quantized model: QAT kernels as packed QArrays, BitNet layers as packed
        :class:`~jaxquant.nn.BitLinear` (``packing`` ``"2bit"``/``"base3"``); float/fp8: the float model."""
        c = self.config
        if c.mode == "qat":
            params = export_params(self.state["params"], self.rules, steps=self.state["lsq_steps"])
            return nnx.merge(self.graphdef, params, self.state["fp8_meta"], self._rest)
        if c.mode == "bitnet":
            return export_bitnet(self.float_model(), packing)
        return self.float_model()

    # -- checkpoints ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the training state to the folder ``path`` (atomically: a temporary folder renamed into place)."""
        import orbax.checkpoint as ocp

        dest = Path(path).absolute()
        dest.parent.mkdir(parents=True, exist_ok=True)
        leaves = jax.tree.leaves(self.state)
        flat = {f"{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
        ckptr = ocp.StandardCheckpointer()
        try:
            ckptr.save(tmp / "state", flat)
            ckptr.wait_until_finished()
            meta = {"format": "jaxquant-train-1", "step": self.step, "leaves": len(leaves), **self.config.to_json()}
            (tmp / "trainer.json").write_text(json.dumps(meta, indent=1))
            if dest.exists():
                old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
                os.replace(dest, old)
                os.replace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(Exception):
                ckptr.wait_until_finished()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            with contextlib.suppress(Exception):
                ckptr.close()
        return dest

    def restore(self, path: str | os.PathLike[str]) -> int:
        """Load a :meth:`save` checkpoint of a run with the same config into this trainer; returns its step.

        Raises:
          ValueError: not a trainer checkpoint, or one of another model/mode (its leaves do not fit).
        """
        import orbax.checkpoint as ocp

        folder = Path(path).absolute()
        mpath = folder / "trainer.json"
        if not mpath.is_file():
            raise ValueError(f"{folder}: not a trainer checkpoint (trainer.json missing)")
        meta = json.loads(mpath.read_text())
        leaves, treedef = jax.tree.flatten(self.state)
        if meta.get("leaves") != len(leaves) or meta.get("mode") != self.config.mode:
            raise ValueError(
                f"{folder}: a checkpoint of another run (mode {meta.get('mode')!r}, {meta.get('leaves')} leaves)"
            )
        target = {f"{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}
        flat = ocp.StandardCheckpointer().restore(folder / "state", target)
        new = []
        for i, ref in enumerate(leaves):
            v = np.asarray(flat[f"{i:05d}"])
            if v.shape != ref.shape or v.dtype != ref.dtype:
                raise ValueError(f"{folder}: leaf {i} is {v.shape} {v.dtype}, the model needs {ref.shape} {ref.dtype}")
            new.append(jnp.asarray(v))
        self.state = jax.tree.unflatten(treedef, new)
        return self.step

    @staticmethod
    def latest_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> Path | None:
        """The ``step_N`` folder with the largest N under ``checkpoint_dir`` (``None`` if there is none)."""
        d = Path(checkpoint_dir)
        found = [
            (int(p.name[5:]), p) for p in d.glob("step_*") if p.name[5:].isdigit() and (p / "trainer.json").is_file()
        ]
        return max(found)[1] if found else None

    def restore_latest(self, checkpoint_dir: str | os.PathLike[str]) -> int:
        """Resume from :meth:`latest_checkpoint` (a no-op returning 0 when there is none)."""
        p = self.latest_checkpoint(checkpoint_dir)
        return 0 if p is None else self.restore(p)
