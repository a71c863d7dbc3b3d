"""Where a benchmark number came from: the commit of the code that produced it (one helper for every script)."""

from __future__ import annotations

import os
import subprocess

__all__ = ["git_commit"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit(length: int = 7) -> str:
    """The checkout's ``HEAD`` as a short hash, with ``" + uncommitted changes"`` when tracked files differ from it,
    or ``"unknown (no git)"`` where git or the repository is missing (e.g. a copied tree on a GPU machine)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", f"--short={length}", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0 or not head.stdout.strip():
            return "unknown (no git)"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return head.stdout.strip() + (" + uncommitted changes" if dirty else "")
