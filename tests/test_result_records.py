"""What result files record: paths that mean the same on another machine, and the machine block's ISA limits; and
that the result files the documentation names exist."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_benchmark

from swiftkv import bench
from swiftkv.files import cache_dir, portable_path
from swiftkv.loading import origin

ROOT = Path(__file__).resolve().parent.parent


def test_portable_path_keeps_names_and_drops_machine_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("SWIFTKV_CACHE", str(tmp_path / "cache"))
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    assert portable_path("smollm2-L22-g1") == "smollm2-L22-g1"  # a bundled name, as typed
    assert portable_path("default") == "default"
    assert portable_path(Path("out/mix/L22/adapter")) == "out/mix/L22/adapter"  # relative: as typed
    assert portable_path(tmp_path / "repo" / "src" / "a") == "src/a"  # inside the working directory
    assert portable_path(cache_dir() / "models" / "SmolLM2") == "<swiftkv cache>/models/SmolLM2"
    assert portable_path("/tmp/gpu/adapter") == "adapter"  # elsewhere: the name only
    assert portable_path("~/x.gguf") == "x.gguf"


def test_eval_origin_records_no_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = origin(str(tmp_path / "ckpt"), "/somewhere/else/adapter", model=None, converted=False)
    assert line == "distilled adapter adapter applied to ckpt"


def test_machine_block_records_the_isa_limits(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS", raising=False)
    machine = bench.machine_info(1)
    assert set(machine["isa_variables"]) == set(bench.ISA_VARIABLES)
    assert machine["isa_variables"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert machine["isa_variables"]["MKL_ENABLE_INSTRUCTIONS"] is None
    assert machine["aten_cpu_capability"] and machine["native_march"]


def test_machine_block_follows_the_environment_of_the_process():
    # The native step's target and ATen's capability are fixed at import: only a fresh process shows them move.
    env = {"ATEN_CPU_CAPABILITY": "default", "SWIFTKV_NATIVE_MARCH": "x86-64-v3"}
    code = "import json; from swiftkv.bench import machine_info; print(json.dumps(machine_info(1)))"
    out = subprocess.run([sys.executable, "-c", code], env=os.environ | env, capture_output=True, text=True, check=True)
    machine = json.loads(out.stdout.strip().splitlines()[-1])
    assert machine["native_march"] == "x86-64-v3" and machine["aten_cpu_capability"] == "DEFAULT"
    assert machine["isa_variables"]["ATEN_CPU_CAPABILITY"] == "default"


def test_domain_quality_records_the_adapter_as_given(tmp_path, monkeypatch):
    domain_quality = load_benchmark("domain_quality")
    adapter = tmp_path / "runs" / "adapter"
    adapter.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert domain_quality.parse_variant(f"x={adapter}") == ("x", {"adapter": str(adapter)})
    assert domain_quality.parse_variant("x=runs/adapter") == ("x", {"adapter": "runs/adapter"})
    assert domain_quality.recorded_variant({"adapter": str(adapter)}) == {"adapter": "runs/adapter"}
    assert domain_quality.recorded_variant({"num_key_value_layers": 22, "key_value_group_size": 1}) == {
        "num_key_value_layers": "22",
        "key_value_group_size": "1",
    }


def _strings(value, where=""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, f"{where}[{i}]")
    elif isinstance(value, str):
        yield where, value


@pytest.mark.parametrize("path", sorted((ROOT / "results").glob("*.json")), ids=lambda p: p.name)
def test_committed_results_name_no_folder_of_one_machine(path):
    for where, text in _strings(json.loads(path.read_text())):
        assert not text.startswith(("/", "~")) and "/work/" not in text and "/root/" not in text, (where, text)


def test_every_committed_domain_variant_can_be_found_or_says_it_cannot():
    # An adapter under the git-ignored out/ is gone with the machine that wrote it: the entry names the commit
    # that holds the same adapter, or says it cannot be re-scored from the repository.
    for name, entry in json.loads((ROOT / "results" / "domains_smollm2.json").read_text()).items():
        variant = entry["variant"]
        if "adapter" not in variant:
            continue
        from_history = "adapter_commit" in variant
        if from_history or variant.get("rescorable") is False:
            continue
        assert not variant["adapter"].startswith("out/"), name


def _expanded(pattern: str) -> list[str]:
    """A shell brace pattern's paths: results/a_{x,y}.{json,png} -> four paths."""
    brace = re.search(r"\{([^{}]*)\}", pattern)
    if brace is None:
        return [pattern]
    head, tail = pattern[: brace.start()], pattern[brace.end() :]
    return [path for alt in brace.group(1).split(",") for path in _expanded(head + alt + tail)]


def test_every_result_file_the_docs_name_exists():
    """A `results/...` path in README.md or docs/ (brace alternatives and globs expanded) names a committed file: a
    table once cited `results/vs_openvino_avx2cpu_rr11_2threads.json`, which no run wrote."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    cited = {(doc.name, ref) for doc in docs for ref in re.findall(r"`(results/[^`\s]+)`", doc.read_text())}
    assert len(cited) > 20
    missing = [(doc, path) for doc, ref in cited for path in _expanded(ref) if not list(ROOT.glob(path))]
    assert not missing
