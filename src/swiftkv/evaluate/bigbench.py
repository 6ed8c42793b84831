"""BIG-bench JSON tasks without installing `bigbench` (it needs tensorflow): read the sdist's `task.json` files.

Where a task comes from, first hit wins:
1. an extracted BIG-bench tree the user points at (`--bigbench-dir DIR` or $SWIFTKV_BIGBENCH_DIR): DIR may be the
   sdist root, its `bigbench/` folder or `bigbench/benchmark_tasks/`;
2. the cache, `<swiftkv cache>/bigbench-1.0.0/benchmark_tasks/<task>/task.json`;
3. a one-off fetch of the `bigbench==1.0.0` sdist from PyPI with pip (~360 MB, about a minute), from which only the
   requested tasks' `task.json` and the list of task names are kept in the cache.

pip >= 26 unpacks the sdist, then refuses it because its metadata declares a direct-URL dependency (bleurt);
`--no-clean` leaves the unpacked tree behind, which is all we need. Older pips save the tarball instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from swiftkv.files import cache_dir, staged

VERSION = "1.0.0"
ENV_DIR = "SWIFTKV_BIGBENCH_DIR"
NAMES_FILE = "task_names.json"
PIP_COMMAND = f"pip download --no-deps --no-binary :all: bigbench=={VERSION}"


def cached_root() -> Path:
    return cache_dir() / f"bigbench-{VERSION}"


def task_json(task: str, bigbench_dir: str | os.PathLike | None = None) -> Path:
    """Path of `task`'s task.json (fetching it once if needed); unknown names list the valid ones."""
    explicit = bigbench_dir or os.environ.get(ENV_DIR)
    if explicit:
        tasks_dir = _tasks_dir(Path(explicit))
        path = tasks_dir / task / "task.json"
        if not path.is_file():
            raise ValueError(_unknown(task, _names_in(tasks_dir), f"in {tasks_dir}"))
        return path
    root = cached_root()
    path = root / "benchmark_tasks" / task / "task.json"
    if path.is_file():
        return path
    names_file = root / NAMES_FILE
    if names_file.is_file() and task not in json.loads(names_file.read_text()):
        raise ValueError(_unknown(task, json.loads(names_file.read_text()), f"in BIG-bench {VERSION}"))
    fetch([task])
    return path


def fetch(tasks: list[str]) -> None:
    """Download the sdist with pip and keep `tasks`' task.json plus the list of task names in the cache."""
    root = cached_root()
    root.mkdir(parents=True, exist_ok=True)
    print(
        f"swiftkv: fetching BIG-bench {VERSION} task data (the bigbench sdist from PyPI, ~360 MB, once)...",
        file=sys.stderr,
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix=".download.", dir=root) as tmp:
        tmp = Path(tmp)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-clean"]
        command += [f"bigbench=={VERSION}", "-d", str(tmp / "dist")]
        # pip unpacks into TMPDIR; keeping it under our temp dir confines (and later removes) the 1.8 GB tree.
        proc = subprocess.run(command, env={**os.environ, "TMPDIR": str(tmp)}, capture_output=True, text=True)
        tarballs = sorted((tmp / "dist").glob(f"bigbench-{VERSION}.tar.gz"))
        unpacked = sorted(tmp.glob("pip-*/*/bigbench/benchmark_tasks"))
        if tarballs:
            names = _copy_from_tarball(tarballs[0], tasks, root)
        elif unpacked:
            names = _copy_from_dir(unpacked[0], tasks, root)
        else:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise FileNotFoundError(
                f"Could not fetch BIG-bench task data with `{PIP_COMMAND}` (exit {proc.returncode}): {tail}\n"
                f"Without network access: download bigbench-{VERSION}.tar.gz from PyPI elsewhere, extract it, and "
                f"pass --bigbench-dir DIR (or set ${ENV_DIR}) to the extracted folder. Do not pip-install bigbench: "
                "it needs tensorflow."
            )
    (root / NAMES_FILE).write_text(json.dumps(names) + "\n")
    missing = [task for task in tasks if task not in names]
    if missing:
        raise ValueError(_unknown(missing[0], names, f"in BIG-bench {VERSION}"))


def _copy_from_dir(tasks_dir: Path, tasks: list[str], root: Path) -> list[str]:
    for task in tasks:
        source = tasks_dir / task / "task.json"
        if source.is_file():
            with staged(root / "benchmark_tasks" / task) as staging:
                staging.mkdir()
                shutil.copyfile(source, staging / "task.json")
    return _names_in(tasks_dir)


def _copy_from_tarball(tarball: Path, tasks: list[str], root: Path) -> list[str]:
    names = []
    with tarfile.open(tarball) as archive:
        for member in archive:
            parts = Path(member.name).parts  # bigbench-1.0.0/bigbench/benchmark_tasks/<task>/task.json
            if len(parts) == 5 and parts[1:3] == ("bigbench", "benchmark_tasks") and parts[4] == "task.json":
                names.append(parts[3])
                if parts[3] in tasks:
                    with staged(root / "benchmark_tasks" / parts[3]) as staging:
                        staging.mkdir()
                        (staging / "task.json").write_bytes(archive.extractfile(member).read())
    return sorted(names)


def _tasks_dir(path: Path) -> Path:
    for candidate in (path, path / "benchmark_tasks", path / "bigbench" / "benchmark_tasks"):
        if candidate.is_dir() and candidate.name == "benchmark_tasks":
            return candidate
    raise FileNotFoundError(
        f"{path} holds no BIG-bench tasks: point --bigbench-dir (or ${ENV_DIR}) at the extracted bigbench-{VERSION} "
        "sdist, its bigbench/ folder, or bigbench/benchmark_tasks/."
    )


def _names_in(tasks_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in tasks_dir.glob("*/task.json"))


def _unknown(task: str, names: list[str], where: str) -> str:
    return f"Unknown BIG-bench task {task!r} {where}. Valid JSON tasks: {', '.join(names)}."
