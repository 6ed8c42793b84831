"""The native extension (csrc/): the decode step, one C++ call per token on CPU, and the prefill's kernels.

The extension is compiled once per machine with its own instruction set (`-march=native`; `SWIFTKV_NATIVE_MARCH=
x86-64-v3` builds for any AVX2 CPU instead) into `<swiftkv cache>/native/<cpu tag>/` (`$SWIFTKV_NATIVE_DIR/<cpu tag>/`
when set), and loaded from there afterwards (a fraction of a second). `swiftkv.load` builds it when it loads a
model on CPU, with a progress line, so no user's first generation pays for the compiler. If it cannot be built,
decoding keeps the Python step (decode.py), prefill PyTorch's ops, and a warning says why once; so they do,
building nothing, when the -march asks for features this CPU lacks (x86-64-v3 without AVX2: the build would die
of an illegal instruction; `missing_isa`). `SWIFTKV_NATIVE=0` turns it off. Which step runs changes nothing but
float32 rounding (tests/test_native.py).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import platform
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import torch
from torch import nn

from swiftkv import cpu
from swiftkv.modeling.cache import SwiftKVCache
from swiftkv.modeling.common import Switch, own_key_value_layers
from swiftkv.modeling.weights import BlockLinear

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCE = CSRC / "decode.cpp"  # the module: the decode step and its products (a test or baseline may point it elsewhere)
# the prefill's kernels, bound by decode.cpp's module
EXTRA_SOURCES = (CSRC / "attention.cpp", CSRC / "elementwise.cpp", CSRC / "products.cpp")
HEADERS = (CSRC / "vec.h",)
# -fopenmp: without it ATen's header-only at::parallel_for compiles to a plain serial loop. torch's wheel ships its
# libgomp as libgomp.so.1 and loads it first, so the extension joins torch's own thread pool (one OpenMP runtime).
OPENMP = ["-fopenmp"] if torch.backends.openmp.is_available() else []
MARCH = os.environ.get("SWIFTKV_NATIVE_MARCH", "native")  # e.g. x86-64-v3: AVX2 + FMA, runs on any such CPU
FLAGS = ["-O3", f"-march={MARCH}", *OPENMP]
NATIVE_DIR_ENV = "SWIFTKV_NATIVE_DIR"
# Linear weights' dtypes the step reads (weights.py's formats): float32, bf16, int8 blocks, int4 blocks (uint8).
NATIVE_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.int8, torch.uint8)
# x86 instruction-set extensions a -march may let the compiler use: its predefined macro -> the flag Linux lists in
# /proc/cpuinfo for them (the names differ for a few: SSE3 is "pni", LZCNT "abm", BMI "bmi1").
ISA_MACROS = {
    "__SSE3__": "pni",
    "__SSSE3__": "ssse3",
    "__SSE4_1__": "sse4_1",
    "__SSE4_2__": "sse4_2",
    "__POPCNT__": "popcnt",
    "__AVX__": "avx",
    "__AVX2__": "avx2",
    "__FMA__": "fma",
    "__F16C__": "f16c",
    "__BMI__": "bmi1",
    "__BMI2__": "bmi2",
    "__LZCNT__": "abm",
    "__MOVBE__": "movbe",
    "__AVX512F__": "avx512f",
    "__AVX512CD__": "avx512cd",
    "__AVX512BW__": "avx512bw",
    "__AVX512DQ__": "avx512dq",
    "__AVX512VL__": "avx512vl",
    "__AVX512IFMA__": "avx512ifma",
    "__AVX512VBMI__": "avx512vbmi",
    "__AVX512VBMI2__": "avx512_vbmi2",
    "__AVX512VNNI__": "avx512_vnni",
    "__AVX512BITALG__": "avx512_bitalg",
    "__AVX512VPOPCNTDQ__": "avx512_vpopcntdq",
    "__AVX512BF16__": "avx512_bf16",
    "__AVX512FP16__": "avx512_fp16",
    "__AVXVNNI__": "avx_vnni",
    "__AMX_TILE__": "amx_tile",
    "__AMX_BF16__": "amx_bf16",
    "__AMX_INT8__": "amx_int8",
}


# native_decode(False): decode.py's Python step inside the block; native_decode(True) allows the native one.
native_decode = Switch(True)


def enabled() -> bool:
    """False inside `native_decode(False)` or when SWIFTKV_NATIVE=0/false/off/no."""
    return native_decode.on and allowed()


def allowed() -> bool:
    """The extension may run at all (SWIFTKV_NATIVE is not 0/false/off/no): its products serve the Python step too."""
    return os.environ.get("SWIFTKV_NATIVE", "1").strip().lower() not in ("0", "false", "off", "no")


def usable():
    """The extension where it may run (`allowed`) and builds here (built on the first call), else None."""
    return extension() if allowed() else None


def _cpu_tag() -> str:
    """Binaries built with -march=native only run on the CPU they were built for: key them by its flags."""
    flags = platform.machine() + " " + " ".join(sorted(cpu.cpu_flags()))
    return hashlib.sha256(flags.encode()).hexdigest()[:12]


@functools.cache
def target_isa(march: str) -> frozenset[str] | None:
    """The CPU flags (ISA_MACROS' names) code compiled with -march=`march` may need, from the macros the compiler
    predefines for it; None when the compiler cannot say (absent, or an -march it does not know)."""
    from torch.utils.cpp_extension import get_cxx_compiler  # the compiler the build itself will run

    command = [get_cxx_compiler(), f"-march={march}", "-dM", "-E", "-x", "c++", "-"]
    try:
        macros = subprocess.run(command, input="", capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    defined = {line.split()[1] for line in macros.splitlines() if line.startswith("#define ")}
    return frozenset(flag for macro, flag in ISA_MACROS.items() if macro in defined)


def missing_isa(march: str) -> list[str]:
    """The CPU flags -march=`march` needs that this CPU lacks: a build for it would die of an illegal instruction
    here. Empty when either side is unknown (no compiler, no /proc/cpuinfo), and for -march=native, which the
    compiler sets from this very CPU (asking it again would only add the kernel's view, which can lag a new CPU)."""
    needed, have = target_isa(march) if march != "native" else None, cpu.cpu_flags()
    if not needed or not have:
        return []
    return sorted(needed - have)


def build_root() -> Path:
    """Where builds live: $SWIFTKV_NATIVE_DIR, else <swiftkv cache>/native, then /<cpu tag>/ (one folder per source
    version inside). The variable lets a build outlive the cache it was made for (the tests' per-run cache)."""
    from swiftkv.files import cache_dir

    explicit = os.environ.get(NATIVE_DIR_ENV)  # empty counts as unset, like SWIFTKV_CACHE
    return (Path(explicit).expanduser() if explicit else cache_dir() / "native") / _cpu_tag()


def _name() -> str:
    code = b"".join(path.read_bytes() for path in (SOURCE, *EXTRA_SOURCES, *HEADERS))
    digest = hashlib.sha256(code + " ".join(FLAGS).encode() + torch.__version__.encode())
    return f"swiftkv_decode_{digest.hexdigest()[:12]}"


@functools.cache
def extension():
    """The compiled module, or None (with one warning) when it cannot be built or run here."""
    if missing := missing_isa(MARCH):  # checked before anything is built or loaded: no illegal instruction later
        warnings.warn(
            f"swiftkv: the native decode step is built for -march={MARCH}, which needs CPU features this CPU lacks "
            f"({', '.join(missing)}); decoding uses the slower Python step. Unset SWIFTKV_NATIVE_MARCH (or set it to "
            "an -march this CPU supports, e.g. native), or set SWIFTKV_NATIVE=0 to silence.",
            stacklevel=2,
        )
        return None
    name = _name()
    build_dir = build_root() / name
    if not any(build_dir.glob("*.so")):
        print(
            f"swiftkv: building the native decode step for -march={MARCH} (once per machine, ~30 s)...",
            file=sys.stderr,
            flush=True,
        )
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        from torch.utils.cpp_extension import load

        _put_ninja_on_path()
        return load(
            name=name,
            sources=[str(path) for path in (SOURCE, *EXTRA_SOURCES)],
            extra_cflags=FLAGS,
            extra_ldflags=OPENMP,
            build_directory=str(build_dir),
        )
    except Exception as error:  # no compiler, no ninja, a build error: the Python step still works
        warnings.warn(
            f"swiftkv: the native decode step could not be built ({type(error).__name__}: {error}); decoding uses "
            "the slower Python step. Install g++ and ninja (pip install ninja), or set SWIFTKV_NATIVE=0 to silence.",
            stacklevel=2,
        )
        return None


def _put_ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the `ninja` wheel's binary is not there unless the venv is active."""
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def runtime(causal_lm, cache: SwiftKVCache, hidden: torch.Tensor):
    """The native model for this generation, or None when the Python step must run (other device/dtype/activation,
    extension unavailable, SWIFTKV_NATIVE=0). Taken once per cache (`_native_model`); weights are referenced, not
    copied."""
    if not enabled() or hidden.device.type != "cpu" or hidden.dtype != torch.float32:
        return None
    if cache.native is None or cache.native_owner is not causal_lm:  # a cache handed to another model: rebuild
        cache.native = _native_model(causal_lm)
        cache.native_owner = causal_lm
    return cache.native or None


# causal LM -> (the fingerprint of what its NativeModel was built from, that NativeModel or False: not supported)
_BUILT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _native_model(causal_lm) -> NativeModel | bool:
    """The model's NativeModel (False where csrc/decode.cpp cannot run it), built again only when something it is
    built from changed: the config's layout or activation, a module, parameter or buffer it reads replaced, or
    moved to other memory (`_fingerprint`). Building takes ~5 ms, which every prompt would otherwise pay for its
    kept token (decode.kept_token_logits) and every generation for its first step; the check ~2 ms."""
    parts = _parts(causal_lm)
    key = _fingerprint(parts)
    built = _BUILT.get(causal_lm)
    if built is None or built[0] != key:
        supported = _supported(causal_lm) and extension() is not None
        built = _BUILT[causal_lm] = key, (_build(parts) if supported else False)
    return built[1]


def _supported(causal_lm) -> bool:
    """The model is what csrc/decode.cpp implements: float32 norms and biases, Linear weights in a format of
    weights.py, SiLU-gated MLP without biases, one RMSNorm eps."""
    model = causal_lm.model
    norms = [m for m in model.modules() if hasattr(m, "variance_epsilon")]
    floats = [p for name, p in causal_lm.named_parameters() if not name.endswith(".weight") or p.dim() == 1]
    return (
        causal_lm.config.hidden_act == "silu"
        and all(layer.mlp.gate_proj.bias is None and layer.mlp.down_proj.bias is None for layer in model.layers)
        and all(p.dtype == torch.float32 for p in floats)
        and all(_matrix(m)[0].dtype in NATIVE_WEIGHT_DTYPES for m in model.modules() if _is_product(m))
        and len({float(m.variance_epsilon) for m in norms}) == 1
    )


@dataclasses.dataclass
class NativeModel:
    runtime: object  # the extension's Runtime: the model's weights, referenced
    storage: list[int]  # per layer: the layer whose cache entry it reads (its AcrossKV leader, or itself)


def step(model: NativeModel, cache: SwiftKVCache, hidden: torch.Tensor, mask, rope, first: int = 0) -> torch.Tensor:
    """The logits [B, 1, V] for token embeddings `hidden` [B, 1, D]; writes this token's K/V into `cache` and
    advances it by one position. `first` > 0, a SwiftKV layer: `hidden` is the input of layer `first` for the cache's
    last position, whose K/V of layers >= first are already cached (a SwiftKV prefill's kept token, decode.py);
    layers before `first` do not run and nothing is written."""
    batch, dim = hidden.shape[0], hidden.shape[-1]
    end = cache.get_seq_length() + (first == 0)  # positions attended, this token's included
    storage = model.storage
    buffers = {idx: cache.layers[idx].reserve(end) for idx in set(storage)}  # K, V [B, Hkv, capacity, Dh]
    cos, sin = (t.reshape(-1, t.shape[-1]).expand(batch, -1).contiguous() for t in rope)  # [B, Dh]
    out = model.runtime.step(
        hidden.reshape(batch, dim),
        cos,
        sin,
        _additive_mask(mask, batch, end),
        [buffers[idx][0] for idx in storage],
        [buffers[idx][1] for idx in storage],
        end - 1,
        first,
    )
    if first == 0:
        for idx in buffers:
            cache.layers[idx].advance(end)
    return out.view(batch, 1, -1)


def _additive_mask(mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """transformers' decode mask [B, 1, 1, S] (bool: True = attend, or additive float) as additive float [B, S]."""
    if mask is None:
        return None
    mask = mask[..., -length:].reshape(batch, length)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, float("-inf"))
    return mask.to(torch.float32).contiguous()


@dataclasses.dataclass
class _Parts:
    """Everything a Runtime is built from (`_build`), gathered by `_parts` and compared by `_fingerprint`."""

    model: tuple  # Runtime's constructor arguments
    swiftkv_norm: tuple | None  # set_swiftkv_norm's, where the model has SwiftKV layers
    layers: list[tuple]  # add_layer's, per layer
    storage: list[int]  # NativeModel.storage
    checked: tuple  # what `_supported` reads besides: the activation, the MLPs' biases


def _parts(causal_lm) -> _Parts:
    model, config = causal_lm.model, causal_lm.config
    own_layers = own_key_value_layers(config)
    layers = []
    for idx, layer in enumerate(model.layers):
        attn, mlp, swiftkv = layer.self_attn, layer.mlp, idx >= own_layers
        q = attn.q_proj_swiftkv if swiftkv else attn.q_proj
        k, v = attn.k_proj, attn.v_proj
        if swiftkv:  # AcrossKV non-leaders (None) read the K/V their leader wrote
            k, v = getattr(attn, "k_proj_swiftkv", None), getattr(attn, "v_proj_swiftkv", None)
        products = [q, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        layers.append(
            (
                _weight(layer.input_layernorm),
                _weight(layer.post_attention_layernorm),
                [_matrix(module) for module in products],
                *(_matrix(k), _matrix(v), _bias(q), _bias(k), _bias(v), _bias(attn.o_proj)),
                *(_weight(getattr(attn, "q_norm", None)), _weight(getattr(attn, "k_norm", None))),
                _eps(layer.input_layernorm),
                float(attn.scaling),
                swiftkv,
            )
        )
    return _Parts(
        model=(
            config.num_attention_heads,
            config.num_key_value_heads,
            model.layers[0].self_attn.head_dim,
            _weight(model.norm),
            _eps(model.norm),
            _matrix(causal_lm.lm_head),
            _bias(causal_lm.lm_head),
        ),
        swiftkv_norm=(
            (_weight(model.norm_swiftkv), _eps(model.norm_swiftkv)) if own_layers < config.num_hidden_layers else None
        ),
        layers=layers,
        storage=[idx if idx < own_layers else config.leader_of(idx) for idx in range(config.num_hidden_layers)],
        checked=(config.hidden_act, [(layer.mlp.gate_proj.bias, layer.mlp.down_proj.bias) for layer in model.layers]),
    )


def _fingerprint(value) -> object:
    """`value` (_Parts, or any of its fields) with each tensor as the memory it is and how it is read: address,
    dtype, shape and strides. Equal fingerprints: a Runtime built from either reads the same memory the same way, and
    sees in place writes either way (a weight `_parts` had to copy, not contiguous, is a new address every time)."""
    if isinstance(value, torch.Tensor):
        return value.data_ptr(), value.dtype, value.shape, value.stride()
    if isinstance(value, _Parts):  # not dataclasses.astuple: it deep-copies tensors
        value = [getattr(value, field.name) for field in dataclasses.fields(value)]
    if isinstance(value, (list, tuple)):
        return tuple(_fingerprint(item) for item in value)
    return value


def _build(parts: _Parts) -> NativeModel:
    """A Runtime holding references to every weight the decode step reads, layer by layer, and the LM head."""
    rt = extension().Runtime(*parts.model)
    if parts.swiftkv_norm is not None:
        rt.set_swiftkv_norm(*parts.swiftkv_norm)
    for args in parts.layers:
        rt.add_layer(*args)
    return NativeModel(rt, parts.storage)


def _weight(module: nn.Module | None) -> torch.Tensor | None:
    return None if module is None else module.weight.detach().contiguous()


def _is_product(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, BlockLinear))


def _matrix(module: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
    """A Linear layer's weight as the extension's Matrix takes it: (data, scales, mins); float and bf16 weights have
    no scales, int8 no mins (weights.py)."""
    if module is None:
        return None
    if isinstance(module, BlockLinear):
        return module.blocks
    return _weight(module), None, None


def _bias(module: nn.Module | None) -> torch.Tensor | None:
    return None if module is None or module.bias is None else module.bias.detach().contiguous()


def _eps(norm: nn.Module) -> float:
    return float(norm.variance_epsilon)
