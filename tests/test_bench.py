"""Tests for swiftkv.bench: the FLOPs / KV-bytes theory, the cache byte count, and a smoke run (no speed asserts)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark, load_script, refused, tiny_base
from transformers import AutoTokenizer, DynamicCache

from swiftkv import bench, theory
from swiftkv.conversion import convert
from swiftkv.files import figure_beside
from swiftkv.modeling import attention, native, weights
from swiftkv.modeling.cache import SwiftKVCache, measured_kv_bytes


@pytest.fixture(scope="module")
def tiny_swiftkv():
    """6-layer Llama, hidden 32, vocab 128, converted with L=3, g=1."""
    return convert(tiny_base("llama", num_layers=6), num_key_value_layers=3, key_value_group_size=1)


def _config(num_layers: int, num_kv_layers: int, group: int):
    return convert(tiny_base("llama", num_layers=num_layers), num_kv_layers, group).config


def test_flops_ratio_is_one_for_a_single_token_without_acrossKV():
    # T=1: every layer runs the one token either way, and with g=1 SwiftKV has one K/V projection per layer too.
    assert theory.theoretical_prefill_flops_ratio(_config(6, 3, 1), 1) == pytest.approx(1.0)


@pytest.mark.parametrize("layout", [(3, 1), (3, 3), (5, 1)])
def test_flops_ratio_falls_toward_L_over_N(layout):
    config = _config(6, *layout)
    lengths = [2, 16, 128, 1024, 8192, 2**20]
    ratios = [theory.theoretical_prefill_flops_ratio(config, t) for t in lengths]
    assert all(later < earlier for earlier, later in zip(ratios, ratios[1:], strict=False))
    floor = layout[0] / 6  # quadratic attention of the first L layers dominates both sides for long prompts
    assert all(r > floor for r in ratios)
    assert ratios[-1] == pytest.approx(floor, abs=2e-3)


def test_flops_ratio_matches_a_hand_count():
    """N=2, L=1, g=1, T=4 on the tiny Llama: D=32, H*Dh=32, Hkv*Dh=16, I=64, V=128."""
    d, q, kv, mlp, vocab, t = 32, 32, 16, 64, 128, 4
    per_token = 2 * (2 * d * q + 2 * d * kv + 3 * d * mlp)
    attention = 4 * q * t * (t + 1) / 2
    full_layer = t * per_token + attention
    base = 2 * full_layer + 2 * d * vocab
    late = 2 * 2 * d * kv * t + 2 * (2 * d * q + 3 * d * mlp) + 4 * q * t  # K/V for T tokens, rest for 1 query
    swift = full_layer + late + 2 * d * vocab
    assert theory.theoretical_prefill_flops_ratio(_config(2, 1, 1), t) == pytest.approx(swift / base)


def test_kv_bytes_ratio_formula():
    assert theory.kv_bytes_ratio(_config(6, 3, 1)) == 1.0
    assert theory.kv_bytes_ratio(_config(6, 2, 2)) == pytest.approx((2 + 2) / 6)


def test_measured_kv_bytes_counts_shared_storage_once():
    cache = DynamicCache()
    keys, values = torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 8)
    cache.update(keys, values, 0)
    cache.layers.append(cache.layers[0])  # a second layer reading the same tensors
    assert measured_kv_bytes(cache) == 2 * keys.numel() * 4


def test_measured_kv_bytes_ratio_is_exact_after_prefill():
    model = convert(tiny_base("llama", num_layers=30), num_key_value_layers=15, key_value_group_size=3)
    ids = bench.prompt_ids(None, model.config.vocab_size, 17)
    kv = bench.measure_kv_bytes(model, ids)
    assert kv["measured_ratio"] == kv["theoretical_ratio"] == theory.kv_bytes_ratio(model.config) == 20 / 30
    assert model.config.swiftkv  # the mode switch restored the model's mode


def test_prompt_ids_have_exact_length():
    assert bench.prompt_ids(None, 128, 37).shape == (1, 37)


def test_prompt_ids_repeat_the_text_to_exact_length(default_model_dir):
    """With the tokenizer `swiftkv bench default` uses (the run converts the default model once for other tests)."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    text = tokenizer(bench.PROMPT_TEXT, add_special_tokens=False)["input_ids"]  # 138 tokens, no BOS
    assert tokenizer.decode(text) == bench.PROMPT_TEXT
    ids = bench.prompt_ids(tokenizer, len(tokenizer), 300)  # two copies of the text and the start of a third
    assert ids.shape == (1, 300) and ids[0].tolist() == text + text + text[: 300 - 2 * len(text)]
    assert bench.prompt_ids(tokenizer, len(tokenizer), 50)[0].tolist() == text[:50]


def test_cropped_cache_decodes_the_same_tokens_again(tiny_swiftkv):
    """measure_decode reuses one prefilled cache by cropping it back to the prompt after every run."""
    cache, first = bench._prefilled(tiny_swiftkv, bench.prompt_ids(None, 128, 12), new_tokens=4)
    assert isinstance(cache, SwiftKVCache)  # what generate uses: the fast decode step
    once = bench.greedy_decode(tiny_swiftkv, cache, first, new_tokens=4)
    cache.crop(-4)
    assert cache.get_seq_length() == 12
    assert torch.equal(bench.greedy_decode(tiny_swiftkv, cache, first, new_tokens=4), once)


def test_run_benchmark_smoke(tiny_swiftkv, tmp_path):
    readable = bench.peak_memory_delta(lambda: None) is not None
    json_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    result = bench.run_benchmark(
        tiny_swiftkv,
        prompt_lengths=[8, 16],
        settings=[(3, 1), (2, 2)],
        reps=2,
        decode_tokens=3,
        json_path=json_path,
        plot_path=plot_path,
        threads=1,
    )
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(result))
    assert plot_path.stat().st_size > 0 and plot_path.read_bytes()[:4] == b"\x89PNG"
    assert {"torch", "threads", "cpu_model"} <= result["machine"].keys()
    assert [(s["num_key_value_layers"], s["key_value_group_size"]) for s in result["settings"]] == [(3, 1), (2, 2)]
    for setting in result["settings"]:
        assert [p["prompt_len"] for p in setting["prefill"]] == [8, 16]
        for entry in setting["prefill"]:
            for mode in ("base", "swiftkv"):
                assert len(entry[mode]["times_s"]) == 2
                assert entry[mode]["min_s"] <= entry[mode]["median_s"] <= entry[mode]["max_s"]
            assert 0 < entry["theoretical_flops_ratio"] < 1 and entry["measured_ratio"] > 0
        assert setting["kv_bytes"]["measured_ratio"] == setting["kv_bytes"]["theoretical_ratio"]
        decode = setting["decode"]
        assert decode["new_tokens"] == 3 and len(decode["swiftkv"]["tokens_per_s"]) == 2
        latency = setting["latency"]  # the decode prompt (16) was a measured prefill length: TTFT is its median
        assert latency["swiftkv"]["ttft_s"] == setting["prefill"][1]["swiftkv"]["median_s"]
        assert latency["base"]["tpot_s"] == 1 / decode["base"]["tokens_per_s_median"]
        # Integers where the process's peak memory can be read (Linux), None for both modes elsewhere.
        peak = setting["peak_memory_bytes"]
        assert peak.keys() == {"base", "swiftkv"}
        assert all(isinstance(v, int) if readable else v is None for v in peak.values())
    assert len(bench.summary_lines(result)) == 1 + 2 * (2 + 3)


def test_peak_memory_delta_sees_a_new_allocation():
    if bench.peak_memory_delta(lambda: None) is None:
        pytest.skip("needs Linux /proc/self/clear_refs")
    size = 64 * 2**20
    grown = bench.peak_memory_delta(lambda: torch.ones(size // 4).sum())  # 64 MiB touched, then freed
    assert size * 0.9 <= grown <= size * 1.5


def test_peak_memory_covers_the_kv_cache():
    """The peak of each mode is at least the KV cache it holds through prefill and decode, counted from the config:
    layers with a cache entry (N in base mode; L + (N-L)/g in SwiftKV mode) x K and V x positions x Hkv*Dh x 4 bytes.
    """
    if bench.peak_memory_delta(lambda: None) is None:
        pytest.skip("needs Linux /proc/self/clear_refs")
    model = convert(tiny_base("llama", hidden=256), num_key_value_layers=3, key_value_group_size=3)
    prompt, new_tokens = 1024, 2
    per_entry = 2 * (prompt + new_tokens) * 2 * 64 * 4  # K and V, positions, Hkv=2 heads of Dh=256/4, float32
    peak = bench.measure_peak_memory(model, bench.prompt_ids(None, 128, prompt), new_tokens)
    assert peak["base"] >= 6 * per_entry  # 6 MiB
    assert peak["swiftkv"] >= (3 + 1) * per_entry


def test_measure_workload_schema():
    model = convert(tiny_base("llama"), 3, 3)
    prompts = torch.randint(3, 128, (3, 20), generator=torch.Generator().manual_seed(0))
    result = bench.measure_workload(model, prompts, new_tokens=2, batch_size=2, reps=1, warmup=0, threads=1)
    assert (result["prompts"], result["prompt_len"], result["new_tokens"]) == (3, 20, 2)
    for mode in ("transformers", "base", "swiftkv"):
        assert len(result[mode]["times_s"]) == 1 and result[mode]["tokens_per_s"] > 0
    assert result["throughput_ratio"] == result["swiftkv"]["tokens_per_s"] / result["base"]["tokens_per_s"]


def test_products_benchmark_end_to_end(tmp_path, monkeypatch):
    """benchmarks/products_vs_openvino.py on a few rows: every engine timed (OpenVINO where installed), JSON
    written; bad sizes are refused (exit 2) before anything runs."""
    products = load_benchmark("products_vs_openvino")
    out = tmp_path / "products.json"
    argv = ["products_vs_openvino.py", "--reps", "1", "--threads", "1", "--json", str(out)]
    refused(products.main, monkeypatch, [*argv, "--rows", "0"], out)
    monkeypatch.setattr(sys, "argv", [*argv, "--rows", "8"])
    products.main()
    result = json.loads(out.read_text())
    assert {"mkl"} <= set(result["median_ms"]) and result["vs_mkl"]["mkl"] == 1.0
    assert result["onednn_preferred"] == (
        torch.backends.cpu.get_cpu_capability() == "AVX512" and "onednn" in result["median_ms"]
    )


def test_roofline_benchmark_end_to_end(tmp_path, monkeypatch):
    """benchmarks/prefill_roofline.py on a short prompt: the peak and the three parts timed, their operations
    counted by hand for the default model, JSON and PNG written; a bad size is refused (exit 2) before any load."""
    roofline = load_benchmark("prefill_roofline")
    out = tmp_path / "roofline.json"
    argv = ["prefill_roofline.py", "--reps", "1", "--threads", "1", "--json", str(out)]
    refused(roofline.main, monkeypatch, [*argv, "--prompt", "1"], out)
    if native.usable() is None:
        pytest.skip("the native extension does not build here")
    monkeypatch.setattr(roofline, "PEAK_ITERATIONS", 1000)
    monkeypatch.setattr(sys, "argv", [*argv, "--prompt", "16"])
    roofline.main()
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert set(result["median_ms"]) == set(roofline.PARTS) and result["fraction_of_peak"]["peak"] == 1.0
    # SmolLM2-135M: 7 products of 16 rows, 9 heads of 64 over a 16-token triangle, 30 layers, the LM head's row
    products = 2 * 16 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
    attention = 2 * 2 * 16**2 / 2 * 9 * 64
    assert result["gflop"]["products"] * 1e9 == pytest.approx(products)
    assert result["gflop"]["prefill"] * 1e9 == pytest.approx(30 * (products + attention) + 2 * 576 * 49152)
    lanes = result["gflop"]["peak"] * 1e9 / (1000 * 12 * 2)  # one thread's 12 vectors of the build's width
    assert lanes in (4, 8, 16)
    layer = result["layer_ms"]
    assert layer["total"] == pytest.approx(layer["products"] + layer["attention"] + layer["rest"])


def test_openvino_comparison_pairs_ttfts_by_repetition(monkeypatch):
    """benchmarks/vs_openvino.py's ratios: of medians, and paired within repetitions, where a host that slows down
    for a whole repetition (both engines 2x slower) does not move the paired ratio; targets report both."""
    vs_openvino = load_benchmark("vs_openvino")

    def row(ttfts):
        return {"ttft_s": sorted(ttfts)[1], "ttfts_s": ttfts, "decode_tokens_per_s": 10.0, "tokens": [1, 2]}

    results = {
        "openvino/default": row([1.0, 2.0, 1.1]),
        "openvino/f32": row([1.0, 2.0, 1.1]),
        "swiftkv-L15/float32": row([0.5, 1.0, 0.55]),  # half of OpenVINO's time in every repetition
        "swiftkv-off/float32": row([1.0, 1.0, 1.0]),
    }
    compared = vs_openvino.comparisons(results, ["float32"])
    ratios = compared["ratios"]
    assert ratios["swiftkv-L15/float32"]["openvino/default"]["paired_ttft"] == pytest.approx(0.5)
    assert ratios["swiftkv-off/float32"]["openvino/default"]["ttft"] == pytest.approx(1.0 / 1.1)
    assert ratios["swiftkv-off/float32"]["openvino/default"]["paired_ttft"] == pytest.approx(1.0 / 1.1)
    assert vs_openvino.paired([3.0, 2.0], [1.0, 4.0]) == pytest.approx(1.75)
    by_engine = {t["engine"]: t for t in compared["targets"]}
    assert by_engine["swiftkv-off/float32"]["paired_ratio"] == pytest.approx(1.1)  # a speed: OpenVINO's time / ours
    # speeds 1.0, 2.0, 1.1 against a target of >= 1.0: every repetition met it
    assert (by_engine["swiftkv-off/float32"]["repetitions_met"], by_engine["swiftkv-off/float32"]["reps"]) == (3, 3)
    assert by_engine["swiftkv-L15/int8"]["met"] is None  # int8 and OpenVINO's int8 export did not run
    monkeypatch.setattr(vs_openvino, "default_format", lambda: "float32")  # its L=15 model is the TTFT target's
    slower = {**results, "swiftkv-L15/float32": row([0.5, 1.2, 0.6])}  # 0.5, 0.6, 0.545 of OpenVINO's time
    ttft = {t["engine"]: t for t in vs_openvino.comparisons(slower, ["float32"])["targets"]}["swiftkv-L15/float32"]
    assert (ttft["paired_ratio"], ttft["repetitions_met"], ttft["reps"]) == (pytest.approx(0.6 / 1.1), 1, 3)


def test_benchmarks_name_formats_by_what_runs(monkeypatch):
    """weights.resolve_formats, which the benchmarks' format lists go through: bf16 on a CPU without bf16 hardware
    runs float32 (a warning says so), named float32 and timed once; with bf16 hardware every asked format stays."""
    monkeypatch.setattr(weights, "native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="running float32 weights instead"):
        assert weights.resolve_formats(["bf16", "float32", "int8"]) == ["float32", "int8"]
    monkeypatch.setattr(weights, "native_bf16", lambda: True)
    assert weights.resolve_formats(["bf16", "float32", "int8"]) == ["bf16", "float32", "int8"]


def test_openvino_curve_gathers_runs_by_prompt_length(tmp_path, monkeypatch):
    """benchmarks/vs_openvino_curve.py: each run's own ratios to OpenVINO's default, by increasing prompt length, JSON
    and PNG; two runs of one length, or a file that is no vs_openvino.py result, refused (exit 2), nothing written."""
    curve = load_benchmark("vs_openvino_curve")
    root = Path(__file__).resolve().parent.parent / "results"
    runs = [str(root / f"vs_openvino_avx2cpu_prompt{n}.json") for n in (128, 32)]
    out = tmp_path / "curve.json"
    refused(curve.main, monkeypatch, ["vs_openvino_curve.py", runs[0], runs[0], "--json", str(out)], out)
    (tmp_path / "other.json").write_text("{}")
    refused(curve.main, monkeypatch, ["vs_openvino_curve.py", str(tmp_path / "other.json"), "--json", str(out)], out)
    monkeypatch.setattr(sys, "argv", ["vs_openvino_curve.py", *runs, "--json", str(out)])
    curve.main()
    result = json.loads(out.read_text())
    points = result["curve"]["swiftkv-L15/int8"]
    assert list(points) == ["32", "128"] and out.with_suffix(".png").stat().st_size > 0
    run32 = json.loads(Path(runs[1]).read_text())
    assert points["32"]["paired_ttft"] == run32["ratios"]["swiftkv-L15/int8"]["openvino/default"]["paired_ttft"]


def test_openvino_comparison_refuses_a_model_it_cannot_time(tmp_path, monkeypatch, capsys):
    """vs_openvino.py --model: a path that is no checkpoint, or one too shallow for the L=22 layout, stops with exit
    2 and a line naming it, before OpenVINO is looked for (so the same on a machine without it); no result written."""
    vs_openvino = load_benchmark("vs_openvino")
    out = tmp_path / "vs.json"
    argv = ["vs_openvino.py", "--json", str(out), "--model"]
    refused(vs_openvino.main, monkeypatch, [*argv, str(tmp_path / "missing")], out)
    assert "--model" in capsys.readouterr().err
    tiny_base("llama", num_layers=6).save_pretrained(tmp_path / "six_layers")
    refused(vs_openvino.main, monkeypatch, [*argv, str(tmp_path / "six_layers")], out)
    assert "has 6 layers; the L=22 layout needs more than 22" in capsys.readouterr().err


def test_rotated_runs_warm_up_untimed_then_rotates_the_first_engine():
    """bench.rotated: warm-up rounds in the given order and not kept, then each round starts one engine later;
    `after_round` sees every timed round's timings (what a long benchmark saves as it goes)."""
    calls = []

    def engine(name):
        return lambda: calls.append(name) or bench.Run(wall_s=len(calls), cpu_s=0.0)

    rounds = []  # after each timed round: how many runs each engine has
    after_round = lambda times: rounds.append({name: len(runs) for name, runs in times.items()})  # noqa: E731
    times = bench.rotated({"a": engine("a"), "b": engine("b"), "c": engine("c")}, 2, 1, after_round)
    assert calls == ["a", "b", "c", "a", "b", "c", "b", "c", "a"]
    assert rounds == [dict.fromkeys("abc", 1), dict.fromkeys("abc", 2)]
    assert {name: [r.wall_s for r in runs] for name, runs in times.items()} == {"a": [4, 9], "b": [5, 7], "c": [6, 8]}


def test_compressible_checkpoint_repeats_each_matrix_first_row():
    """scripts/compressible_checkpoint.py: every 2-D weight becomes its first row repeated (tied embeddings once),
    1-D norm weights stay; shapes, and so the compute, are unchanged."""
    script = load_script("compressible_checkpoint")
    model = tiny_base("llama", num_layers=2)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    script.repeat_first_rows(model)
    for name, param in model.named_parameters():
        assert param.shape == before[name].shape
        expected = before[name][:1].expand_as(param) if param.dim() == 2 else before[name]
        assert torch.equal(param, expected), name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_benchmark_figures_go_beside_their_json():
    """Without --plot a benchmark's PNG goes beside its --json (a run to a new JSON path once overwrote another
    run's committed figure): one helper, and no script with a fixed default PNG left."""
    assert figure_beside("results/run.json") == Path("results/run.png")
    assert figure_beside("results/run.json", "elsewhere.png") == Path("elsewhere.png")
    scripts = sorted((Path(__file__).resolve().parent.parent / "benchmarks").glob("*.py"))
    fixed = [s.name for s in scripts if re.search(r'"--plot"[^\n]*default=[^\n]*\.png"\)', s.read_text())]
    assert scripts and not fixed


def test_threads_label_counts_one_thread_in_the_singular():
    assert [bench.threads_label(n) for n in (1, 2, 16)] == ["1 thread", "2 threads", "16 threads"]


def test_prefill_profile_groups_a_tiny_models_ops(tmp_path, monkeypatch):
    """benchmarks/prefill_profile.py: ATen ops and native kernels (pybind names) sorted into groups, the rest of the
    wall time kept as `rest`; a checkpoint too shallow for the layout refused (exit 2); end to end on a tiny one,
    products are seen and the parts add up."""
    profile = load_benchmark("prefill_profile")
    assert profile.op_name(
        "<built-in method rms_norm of pybind11_builtins.pybind11_detail_function_record object>"
    ) == ("rms_norm")
    assert profile.op_name("aten::mm") == "aten::mm" and profile.op_name("threading.py(331): wait") is None
    groups = profile.grouped({"aten::mm": 3.0, "prefill_linear": 4.0, "prefill_attention": 2.0, "aten::add": 1.0})
    assert (groups["products"], groups["attention"], groups["other ops"]) == (7.0, 2.0, 1.0)
    out = tmp_path / "profile.json"
    tiny_base("llama", num_layers=6).save_pretrained(tmp_path / "six_layers")  # too few for L=15
    argv = ["prefill_profile.py", "--prompt", "16", "--reps", "1", "--threads", "1", "--json", str(out), "--model"]
    refused(profile.main, monkeypatch, [*argv, str(tmp_path / "six_layers")], out)
    tiny_base("llama", num_layers=24).save_pretrained(tmp_path / "tiny")
    monkeypatch.setattr(sys, "argv", [*argv, str(tmp_path / "tiny"), "--weights", "float32", "--swiftkv", "L22"])
    profile.main()
    result = json.loads(out.read_text())
    assert result["groups_ms"]["products"] > 0 and result["swiftkv"] == "L22" and out.with_suffix(".png").is_file()
    assert sum(result["groups_ms"].values()) + result["rest_ms"] == pytest.approx(result["wall_ms"])


@pytest.mark.skipif(not attention.kernel_available(), reason="the switch replaces the native kernel, not built here")
def test_prefill_profile_sdpa_bf16_runs_pytorchs_bf16_attention(tmp_path, monkeypatch):
    """prefill_profile --attention sdpa-bf16 (SwiftKV on too): the profiled prefills of a bf16 model run
    `attention.sdpa_for_bf16_layers` (counted), and their time lands in the attention group."""
    profile = load_benchmark("prefill_profile")
    calls, sdpa = [], attention._sdpa_bf16_attention
    monkeypatch.setattr(attention, "_sdpa_bf16_attention", lambda *args: calls.append(1) or sdpa(*args))
    monkeypatch.setattr(weights, "native_bf16", lambda: True)  # bf16 weights load as such (emulated here)
    tiny_base("llama", num_layers=24, hidden=256).save_pretrained(tmp_path / "tiny")  # 4 heads of 64: the kernel's
    out = tmp_path / "profile.json"
    argv = ["prefill_profile.py", "--prompt", "16", "--reps", "1", "--threads", "1", "--json", str(out)]
    options = ["--weights", "bf16", "--attention", "sdpa-bf16", "--swiftkv", "L15"]
    monkeypatch.setattr(sys, "argv", [*argv, "--model", str(tmp_path / "tiny"), *options])
    profile.main()
    result = json.loads(out.read_text())
    assert calls and result["attention"] == "sdpa-bf16" and result["groups_ms"]["attention"] > 0
    assert result["weights"] == "bf16"
    monkeypatch.setattr(weights, "native_bf16", lambda: False)  # bf16 asked where it would be emulated: float32 runs
    with pytest.warns(UserWarning, match="running float32 weights instead"):
        profile.main()
    assert json.loads(out.read_text())["weights"] == "float32"
