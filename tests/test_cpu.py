"""CPU features read in one place (swiftkv.cpu), and a native step built for features this CPU lacks: never loaded
(it would die of an illegal instruction), the Python step runs instead, with a warning."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded_batch, tiny_base

from swiftkv import cpu
from swiftkv.conversion import convert
from swiftkv.modeling import native

needs_compiler = pytest.mark.skipif(native.target_isa("x86-64-v3") is None, reason="no C++ compiler to ask")


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    """Point swiftkv.cpu at a /proc/cpuinfo written by the test."""

    def write(text: str) -> None:
        (tmp_path / "cpuinfo").write_text(text)
        cpu.cpu_flags.cache_clear()

    monkeypatch.setattr(cpu, "CPUINFO", tmp_path / "cpuinfo")
    yield write
    cpu.cpu_flags.cache_clear()


def test_cpu_flags_are_the_first_flags_line(cpuinfo):
    cpuinfo("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx2 fma\n")
    assert cpu.cpu_flags() == {"fpu", "sse2", "avx2", "fma"}
    assert not cpu.has_avx512_bf16() and not cpu.has_amx_tile()
    cpuinfo("flags\t\t: fpu avx512f avx512_bf16 amx_tile\n")
    assert cpu.has_avx512_bf16() and cpu.has_amx_tile()
    cpuinfo("Features\t: fp asimd sve\n")  # Arm's name for the line
    assert cpu.cpu_flags() == {"fp", "asimd", "sve"}


def test_unreadable_cpuinfo_means_unknown(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "CPUINFO", tmp_path / "absent")
    cpu.cpu_flags.cache_clear()
    try:
        assert cpu.cpu_flags() == frozenset()
    finally:
        cpu.cpu_flags.cache_clear()


def test_bf16_and_amx_agree_with_torchs_own_detection():
    """torch's (private) checks ask the CPU itself; these read Linux's flags: the same answer on this machine."""
    assert cpu.has_avx512_bf16() == torch.cpu._is_avx512_bf16_supported()
    assert cpu.has_amx_tile() == torch.cpu._is_amx_tile_supported()


@needs_compiler
def test_x86_64_v3_needs_avx2_fma_and_the_bit_instructions():
    v3 = native.target_isa("x86-64-v3")
    assert {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "movbe"} <= v3
    assert not any(flag.startswith("avx512") for flag in v3)
    assert {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= native.target_isa("x86-64-v4")
    assert native.target_isa("not-a-cpu") is None


@needs_compiler
def test_missing_isa_names_what_the_cpu_lacks(monkeypatch):
    v3 = native.target_isa("x86-64-v3")
    monkeypatch.setattr(cpu, "cpu_flags", lambda: v3 | {"fpu"})
    assert native.missing_isa("x86-64-v3") == []
    monkeypatch.setattr(cpu, "cpu_flags", lambda: v3 - {"avx2", "fma"})
    assert native.missing_isa("x86-64-v3") == ["avx2", "fma"]
    assert native.missing_isa("native") == []  # the compiler reads this very CPU


@needs_compiler
def test_a_native_step_for_features_the_cpu_lacks_is_never_built_or_loaded(tmp_path, monkeypatch):
    """SWIFTKV_NATIVE_MARCH=x86-64-v3 on a CPU without AVX2 (simulated): a warning, and generate runs the Python
    step."""
    monkeypatch.setattr(cpu, "cpu_flags", lambda: native.target_isa("x86-64-v2") | {"fpu"})
    monkeypatch.setattr(native, "MARCH", "x86-64-v3")
    monkeypatch.setenv(native.NATIVE_DIR_ENV, str(tmp_path / "native"))
    native.extension.cache_clear()
    try:
        with pytest.warns(UserWarning, match=r"-march=x86-64-v3, which needs CPU features this CPU lacks \(.*avx2"):
            assert native.extension() is None
        assert not (tmp_path / "native").exists()  # nothing compiled, nothing loaded
        model = convert(tiny_base("llama"), 3, 1)
        model.generation_config.eos_token_id = None
        ids, mask = left_padded_batch()
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True
        )
        assert out.sequences.shape[1] == ids.shape[1] + 3 and not out.cache.native
    finally:
        native.extension.cache_clear()
