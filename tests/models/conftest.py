"""Fixtures for the model tests: the real SmolLM2 GGUF (fetched once into the cache) and its loaded forms.

$JAXQUANT_GGUF, if set, names the GGUF file to use instead of the cached asset.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _gguf_path() -> Path:
    env = os.environ.get("JAXQUANT_GGUF")
    if env:
        return Path(env)
    from jaxquant.eval import assets

    return Path(assets.model_path())


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf ($JAXQUANT_GGUF overrides the cache)."""
    return _gguf_path()


@pytest.fixture(scope="session")
def smollm(gguf_path):
    """(config, params, tokenizer) of the real model, loaded once."""
    from jaxquant.models import load_gguf

    return load_gguf(gguf_path)


@pytest.fixture(scope="session")
def smollm_model(smollm):
    from jaxquant.models import Llama

    config, params, _ = smollm
    return Llama.from_params(config, params)


@pytest.fixture(scope="session")
def tokenizer(smollm):
    return smollm[2]
