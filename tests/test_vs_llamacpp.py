"""benchmarks/vs_llamacpp.py: issue 33's decode targets read from a run's decode rates."""

from __future__ import annotations

from conftest import load_benchmark


def test_targets_compare_each_format_with_its_gguf_type():
    bench = load_benchmark("vs_llamacpp")
    decode = {
        "swiftkv/int8": {"tokens_per_s": 60.0},
        "llama.cpp/Q8_0": {"tokens_per_s": 50.0},
        "swiftkv/int4": {"tokens_per_s": 40.0},
        "llama.cpp/Q4_0": {"tokens_per_s": 50.0},
    }
    int8, int4 = bench.targets(decode)
    assert (int8["engine"], int8["against"], int8["target"]) == ("swiftkv/int8", "llama.cpp/Q8_0", ">= 1.2")
    assert int8["ratio"] == 1.2 and int8["met"]
    assert int4["ratio"] == 0.8 and not int4["met"]


def test_a_target_whose_engines_did_not_run_is_left_out():
    """Only F32 given (--gguf F32=...): no quantized pair ran, so no target is claimed either way."""
    bench = load_benchmark("vs_llamacpp")
    assert bench.targets({"swiftkv/float32": {"tokens_per_s": 1.0}, "llama.cpp/F32": {"tokens_per_s": 1.0}}) == []
