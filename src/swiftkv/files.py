"""Atomic output directories: a checkpoint is either absent, the previous version, or complete."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def prepare_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing non-empty `out` unless `overwrite`; nothing is written here."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"Output {out} exists and is not empty; pass --overwrite (overwrite=True) to replace it.")
    return out


@contextlib.contextmanager
def staged(dest: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a path in a hidden sibling temp dir; rename it onto ``dest`` only if the block succeeds.

    A rename within one filesystem is atomic, so ``dest`` is either absent, the old version, or complete.
    The temp dir, with anything half-written or replaced, is deleted either way.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.", dir=dest.parent) as tmp:
        staging = Path(tmp) / dest.name
        yield staging
        if replace and dest.exists():
            dest.rename(Path(tmp) / "replaced")  # moved aside, not deleted in place, so dest is never half gone
        os.replace(staging, dest)


def write_json(data, path: str | os.PathLike) -> Path:
    """Write `data` as indented JSON atomically (a reader never sees half a file); parents created."""
    path = Path(path)
    with staged(path, replace=True) as staging:
        staging.write_text(json.dumps(data, indent=2) + "\n")
    return path


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write a matplotlib figure as PNG (parent directories created) and free it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
