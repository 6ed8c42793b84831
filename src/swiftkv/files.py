"""Atomic outputs: a checkpoint or JSON file is either absent, the previous version, or complete; damaged inputs
are named as such."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
    """Where swiftkv keeps what it builds or fetches (converted models, native builds, data): $SWIFTKV_CACHE,
    else $XDG_CACHE_HOME/swiftkv, else ~/.cache/swiftkv."""
    # Empty variables count as unset, as the XDG spec asks.
    if explicit := os.environ.get("SWIFTKV_CACHE"):
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "swiftkv"


def portable_path(path: str | os.PathLike) -> str:
    """How a result file records a path it used, so the record means the same on another machine: as given when
    relative (`default`, a bundled adapter's name, `out/...`), `<swiftkv cache>/...` inside the cache, relative to
    the working directory (the repository) inside it, else its last component: an absolute path only names one
    machine's folders. Only this module's standard-library imports: benchmarks in other venvs load it by path."""
    text = os.fspath(path)
    if not Path(text).expanduser().is_absolute():
        return text
    resolved = Path(text).expanduser().resolve()
    for root, prefix in ((cache_dir().expanduser().resolve(), "<swiftkv cache>/"), (Path.cwd().resolve(), "")):
        if resolved.is_relative_to(root) and resolved != root:
            return prefix + resolved.relative_to(root).as_posix()
    return resolved.name


def prepare_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing non-empty `out` unless `overwrite`, and never the current directory or one holding it
    (replacing it would pull the ground from under the process); nothing is written here."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"Output {out} exists and is not empty; pass --overwrite (overwrite=True) to replace it.")
    cwd = Path.cwd().resolve()
    if out.exists() and (out.resolve() == cwd or out.resolve() in cwd.parents):
        raise ValueError(
            f"Output {str(out)!r} is the current directory or contains it ({cwd}); write to a new directory instead."
        )
    return out


STAGING_TAG = ".staging-"  # hidden staging dirs are named .{dest name}.staging-{pid}-{random}


@contextlib.contextmanager
def staged(dest: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a path in a hidden sibling temp dir; rename it onto ``dest`` only if the block succeeds.

    A rename within one filesystem is atomic, so ``dest`` is either absent, the old version, or complete.
    The temp dir, with anything half-written or replaced, is deleted on any exit the process survives; one left
    by a killed process (SIGKILL, power loss) is removed by the next `staged` of the same ``dest``.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(dest)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}{STAGING_TAG}{os.getpid()}-", dir=dest.parent) as tmp:
        staging = Path(tmp) / dest.name
        yield staging
        if replace and dest.exists():
            dest.rename(Path(tmp) / "replaced")  # moved aside, not deleted in place, so dest is never half gone
        os.replace(staging, dest)


def remove_stale_staging(dest: Path) -> list[Path]:
    """Delete the staging dirs of ``dest`` whose process is gone (pid in the name); returns what was removed."""
    removed = []
    for folder in dest.parent.glob(f".{glob.escape(dest.name)}{STAGING_TAG}*"):
        pid = folder.name[len(f".{dest.name}{STAGING_TAG}") :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            shutil.rmtree(folder, ignore_errors=True)
            print(f"swiftkv: removed {folder} ({size / 2**20:.1f} MiB), left by a killed run", file=sys.stderr)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    return True


def read_json_file(path: str | os.PathLike, what: str) -> object:
    """Parse a JSON file; a damaged one is a ValueError naming the file, `what` it is and where it breaks."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{what} is damaged: {path} is not valid JSON ({error}).") from None


def check_safetensors(path: str | os.PathLike, what: str) -> None:
    """Open a .safetensors file's header; a truncated or corrupt one is a ValueError naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):
            pass
    except SafetensorError as error:
        raise ValueError(
            f"{what} is damaged: {path} is not a complete safetensors file ({error}); copy or write it again."
        ) from None


def write_json(data, path: str | os.PathLike) -> Path:
    """Write `data` as indented JSON atomically (a reader never sees half a file); parents created."""
    path = Path(path)
    with staged(path, replace=True) as staging:
        staging.write_text(json.dumps(data, indent=2) + "\n")
    return path


def figure_beside(json_path: str | os.PathLike, plot_path: str | os.PathLike | None = None) -> Path:
    """Where a benchmark's PNG goes: `plot_path` when given, else its JSON's path with .png, so that a run written to
    a new JSON never overwrites another run's figure."""
    return Path(plot_path) if plot_path is not None else Path(json_path).with_suffix(".png")


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write a matplotlib figure as PNG (parent directories created) and free it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
