"""Issue 19's table of bad inputs, each through the CLI where a user meets it: one clear line on stderr naming the
value and what is valid, exit status 2, and nothing written."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swiftkv.cli import IO_FAILURE, commands, main
from swiftkv.files import STAGING_TAG, remove_stale_staging

CONFIGS = Path(__file__).resolve().parent.parent / "configs"  # whatever the working directory


@pytest.fixture
def model_dir(chat_dir):
    return chat_dir


def _fails(argv: list[str], capsys, *messages: str) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("swiftkv ")]  # (progress bars share stderr)
    assert len(errors) == 1 and "error: " in errors[0] and "Traceback" not in err, err
    for message in messages:
        assert message in err, err
    return err


def _argparse_fails(argv: list[str], capsys, message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_generate_empty_prompt(model_dir, capsys):
    _fails(["generate", model_dir, "--prompt", ""], capsys, "--prompt is empty")


def test_batch_empty_prompt_is_refused_before_any_output(model_dir, tmp_path, capsys):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"prompt": "w5 w9"}\n{"prompt": ""}\n')
    for size in ("1", "2"):
        _fails(
            ["generate", model_dir, "--input", prompts, "--output", tmp_path / "out.jsonl", "--batch-size", size],
            capsys,
            "line 2 has an empty prompt",
        )
    assert not (tmp_path / "out.jsonl").exists()


def test_batch_size_zero(model_dir, tmp_path, capsys):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"prompt": "w5 w9"}\n')
    out = tmp_path / "out.jsonl"
    _argparse_fails(
        ["generate", model_dir, "--input", prompts, "--output", out, "--batch-size", "0"],
        capsys,
        "--batch-size: 0 is invalid: it must be >= 1",
    )
    assert not out.exists()


def test_prompt_longer_than_the_context(model_dir, tmp_path, capsys):
    long_prompt = " ".join(["w9"] * 300)  # 300 tokens, 256 positions
    _fails(
        ["generate", model_dir, "--prompt", long_prompt],
        capsys,
        "the prompt has 300 tokens",
        "context of 256 positions",
    )
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": long_prompt}) + "\n")
    _fails(["generate", model_dir, "--input", prompts, "--output", tmp_path / "o.jsonl"], capsys, "prompt id 'a'")
    assert not (tmp_path / "o.jsonl").exists()


def test_convert_of_a_cut_off_config(model_dir, tmp_path, capsys):
    config = model_dir / "config.json"
    config.write_text(config.read_text()[:40])
    _fails(["convert", model_dir, tmp_path / "out", "-L", "3"], capsys, "is damaged", "config.json is not valid JSON")
    assert not (tmp_path / "out").exists()


def test_convert_of_a_truncated_safetensors(model_dir, tmp_path, capsys):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _fails(["convert", model_dir, tmp_path / "out", "-L", "3"], capsys, "model.safetensors is not a complete")
    assert not (tmp_path / "out").exists()


def test_truncated_adapter(model_dir, tmp_path, capsys):
    from swiftkv import adapter
    from swiftkv.conversion import convert
    from swiftkv.loading import load_model

    model, _ = load_model(model_dir)
    adapter.save_adapter(convert(model, 3, 1), tmp_path / "adapter", base_name=str(model_dir))
    weights = tmp_path / "adapter" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    _fails(["apply-adapter", model_dir, tmp_path / "adapter", tmp_path / "out"], capsys, "adapter", "is damaged")
    _fails(["eval", model_dir, "--adapter", tmp_path / "adapter", "--tasks", "domains@1"], capsys, "is damaged")
    _fails(["generate", model_dir, "--adapter", tmp_path / "adapter", "--prompt", "w5"], capsys, "is damaged")
    assert not (tmp_path / "out").exists()


def test_convert_overwrite_onto_the_current_directory(model_dir, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    _fails(["convert", model_dir, ".", "-L", "3", "--overwrite"], capsys, "is the current directory")
    _fails(["convert", model_dir, "..", "-L", "3", "--overwrite"], capsys, "contains it")
    assert _files(work) == ["keep.txt"]


def test_eval_zero_and_negative_limits(model_dir, capsys):
    _fails(["eval", model_dir, "-L", "3", "--tasks", "ppl:chitchat@0"], capsys, "@0 is invalid")
    _argparse_fails(["eval", model_dir, "--limit", "-1"], capsys, "--limit: -1 is invalid: it must be >= 1")


def test_bench_validates_every_layout_before_measuring(model_dir, tmp_path, capsys):
    out = tmp_path / "b.json"
    argv = [
        "bench",
        model_dir,
        "--settings",
        "3:1",
        "3:2",
        "--prompt-lengths",
        "8",
        "--json",
        out,
        "--plot",
        tmp_path / "b.png",
        "--reps",
        "1",
        "--decode-tokens",
        "1",
    ]
    _fails(argv, capsys, "key_value_group_size=2 does not divide the 3 SwiftKV layers")
    assert not out.exists()
    _argparse_fails(["bench", model_dir, "--prompt-lengths", "0"], capsys, "--prompt-lengths: 0 is invalid")
    _argparse_fails(["bench", model_dir, "--settings", "3x1"], capsys, "layout '3x1' is invalid: write L:g")


@pytest.mark.parametrize("layout", [["-L", "40"], ["-L", "3", "-g", "2"]])
def test_a_layout_that_does_not_fit_fails_before_any_weight_is_read(model_dir, capsys, monkeypatch, layout):
    """`swiftkv demo --weights int4 -L 40` on the default model wrote its int4 block cache, then refused L=40."""
    from swiftkv import loading

    def read_weights(*args, **kwargs):
        raise AssertionError("weights read before the layout was checked")

    monkeypatch.setattr(loading, "_load_model", read_weights)
    monkeypatch.setattr(loading, "default_model_blocks", read_weights)
    argv = ["demo", model_dir, *layout, "--adapter", "none", "--weights", "int4", "--prompt-tokens", "64"]
    _fails(argv, capsys, "num_key_value_layers=40 is invalid" if "40" in layout else "does not divide")


def test_bench_keeps_each_layout_and_resumes(model_dir, tmp_path, capsys):
    out = tmp_path / "b.json"
    base = [
        "bench",
        str(model_dir),
        "--prompt-lengths",
        "8",
        "--json",
        str(out),
        "--plot",
        str(tmp_path / "b.png"),
        "--reps",
        "1",
        "--decode-tokens",
        "1",
        "--threads",
        "1",
        "--settings",
    ]
    assert main([*base, "3:1"]) == 0
    first = json.loads(out.read_text())["settings"]
    assert main([*base, "3:1", "3:3"]) == 0  # 3:1 is taken from the file, only 3:3 is measured
    settings = json.loads(out.read_text())["settings"]
    assert settings[0] == first[0] and [s["key_value_group_size"] for s in settings] == [1, 3]


def test_distill_data_with_a_malformed_line_names_file_and_line(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    lines = [json.dumps({"text": f"w{i} w9"}) for i in range(5)] + ['{"text": "w5" "w6"}']
    data.write_text("\n".join(lines) + "\n")
    _fails(
        ["distill", CONFIGS / "smollm2.yaml", f"data=[{data}]", "max_steps=1", f"output_dir={tmp_path / 'o'}"],
        capsys,
        f"{data}: line 6 is not valid JSON",
    )


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/data/out/model.safetensors"), IO_FAILURE),
        (PermissionError(errno.EACCES, "Permission denied", "/data/out"), IO_FAILURE),
        (OSError(errno.EIO, "Input/output error", "/data/a", "/data/b"), IO_FAILURE),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "prompts.jsonl"), 2),  # the user's input
    ],
)
def test_a_failing_system_is_not_bad_input(monkeypatch, capsys, error, status):
    def fails(_args):
        raise error

    monkeypatch.setattr(commands, "cmd_info", fails)
    assert main(["info", "default"]) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("swiftkv info: error: ") and error.strerror in err, err
    assert all(path in err for path in (error.filename, error.filename2) if path), err
    assert ("input/output failure" in err) == (status == IO_FAILURE), err


def test_stale_staging_folder_of_a_dead_process_is_removed(tmp_path):
    dest = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out{STAGING_TAG}{dead.stdout.strip()}-abc"
    live = tmp_path / f".out{STAGING_TAG}{os.getpid()}-xyz"
    for folder in (stale, live):
        (folder / "out").mkdir(parents=True)
    assert remove_stale_staging(dest) == [stale]
    assert not stale.exists() and live.exists()


def _convert_paused_in_staging(model_dir: Path, out: Path) -> subprocess.Popen:
    """`swiftkv convert` in a child process, stopped after writing the checkpoint into its staging folder; an
    interruption there takes a second ('cleaning' ... 'cleaned') before the staging folder is removed."""
    script = (
        "import contextlib, sys, time\n"
        "import swiftkv.conversion as c\n"
        "real = c.staged\n"
        "@contextlib.contextmanager\n"
        "def slow(dest, replace=False):\n"
        "    with real(dest, replace) as staging:\n"
        "        yield staging\n"
        "        print('written', flush=True)\n"
        "        try:\n"
        "            time.sleep(60)\n"
        "        except BaseException:\n"
        "            print('cleaning', flush=True)\n"
        "            time.sleep(1)\n"
        "            print('cleaned', flush=True)\n"
        "            raise\n"
        "c.staged = slow\n"
        "from swiftkv.cli import main\n"
        f"sys.exit(main(['convert', {str(model_dir)!r}, {str(out)!r}, '-L', '3']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"
    return proc


def test_sigkill_during_convert_leaves_no_staging_after_the_next_run(model_dir, tmp_path):
    """Kill -9 `swiftkv convert` while it writes; the next convert into the same parent removes the leftover."""
    out = tmp_path / "out"
    proc = _convert_paused_in_staging(model_dir, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = [p for p in tmp_path.iterdir() if STAGING_TAG in p.name]
    assert len(leftovers) == 1 and not out.exists()
    assert main(["convert", str(model_dir), str(out), "-L", "3"]) == 0
    assert not [p for p in tmp_path.iterdir() if STAGING_TAG in p.name] and (out / "config.json").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_same_signal_again_does_not_cut_the_cleanup_short(model_dir, tmp_path, sig):
    """A second Ctrl-C while an interrupted command cleans up (impatience, or `timeout` passing its own SIGINT on)
    cut the cleanup short and could end in a traceback."""
    out = tmp_path / "out"
    proc = _convert_paused_in_staging(model_dir, out)
    proc.send_signal(sig)
    assert proc.stdout.readline().strip() == "cleaning"
    proc.send_signal(sig)
    assert proc.stdout.readline().strip() == "cleaned"
    assert proc.wait(timeout=30) == (130 if sig == signal.SIGINT else 128 + sig)
    assert not [p for p in tmp_path.iterdir() if STAGING_TAG in p.name] and not out.exists()


def test_sigterm_during_convert_cleans_up(model_dir, tmp_path):
    out = tmp_path / "out"
    proc = _convert_paused_in_staging(model_dir, out)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    time.sleep(0.1)
    assert not [p for p in tmp_path.iterdir() if STAGING_TAG in p.name] and not out.exists()
