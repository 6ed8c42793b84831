"""The golden-loss run of tests/test_distill.py outside pytest: prints each step's loss and hidden term and their
relative difference from the recorded goldens, under whatever CPU kernels ATen dispatches in this process.

docs/testing.md's table of the spread across capabilities came from (run from the repository root):

    for capability in default avx2 avx512; do
        ATEN_CPU_CAPABILITY=$capability .venv/bin/python scripts/golden_probe.py
    done
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test's own run and its goldens

import torch  # noqa: E402
from test_distill import GOLDEN_HIDDEN, GOLDEN_LOSSES, golden_run  # noqa: E402
from test_distill_helpers import chat_file, tiny_model_dir  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model_dir, chats = tiny_model_dir(folder / "llama"), chat_file(folder / "chats.jsonl")
        losses, hidden = golden_run(model_dir, chats, folder / "run")
    print(f"ATen CPU capability: {torch.backends.cpu.get_cpu_capability()}")
    for name, values, golden in (("loss", losses, GOLDEN_LOSSES), ("hidden", hidden, GOLDEN_HIDDEN)):
        print(f"{name:7s}" + "".join(f" {value:.6e}" for value in values))
        spread = (value / gold - 1 for value, gold in zip(values, golden, strict=True))
        print(f"{'vs gold':7s}" + "".join(f" {relative:+.1e}" for relative in spread))


if __name__ == "__main__":
    main()
