"""One SwiftKV causal LM for vLLM over vLLM's own building blocks, for llama, mistral, qwen2 and qwen3.

The forward (shapes: T tokens scheduled in this step, K kept rows, D hidden, Hkv key/value heads, Dh head dim):

    h = layers[0:L](embed(ids))                          # every token; caches of layers 0..L-1 written
    x = norm_swiftkv(h)                                  # [T, D]
    each AcrossKV leader: K, V = k/v_proj_swiftkv(x)     # [T, Hkv*Dh], k_norm (qwen3), RoPE at each position
                          -> written ONCE into the group's cache entry (a `SwiftKVCacheWriter`)
    h_keep = h[rows the sampler needs]                   # [K, D]: one row per request at prefill (fast prefill)
    h_keep = layers[L:N](h_keep)                         # q_proj_swiftkv queries, K/V from the group's writer
    return norm(h_keep) scattered back into [T, D]

How it maps on vLLM 0.32 (no patch of its runner): every attention of a layer >= L is an `Attention` with
`kv_sharing_target_layer_name` = its group's writer, so the engine allocates L + (N-L)/g cache entries (AcrossKV
memory is real). The writers are built before layers L..N-1, so those layers are the trailing run of KV-sharing
layers that `cache_config.kv_sharing_fast_prefill` serves with metadata for the kept rows only (any backend), and
the model reads the kept rows from that metadata, as vLLM's Gemma3n does. With fast prefill off every row runs
every layer (the full SwiftKV forward: same tokens, no saving).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.attention.attention import unified_kv_cache_update
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.llama import LlamaMLP
from vllm.model_executor.models.utils import maybe_prefix
from vllm.sequence import IntermediateTensors
from vllm.utils.torch_utils import _encode_layer_name
from vllm.v1.attention.backends.utils import KVSharingFastPrefillMetadata

from swiftkv_vllm.configs import SwiftKVLayout


@dataclass(frozen=True)
class AttentionShape:
    """What differs between the four families' attention, read from the HF config (as transformers builds it)."""

    hidden: int
    heads: int  # query heads, this tensor-parallel rank
    kv_heads: int  # key/value heads, this rank
    head_dim: int
    qkv_bias: bool  # qwen2: always; llama/qwen3: attention_bias; mistral: never
    o_bias: bool
    qk_norm: bool  # qwen3: per-head RMSNorm on queries and keys

    @classmethod
    def of(cls, config) -> AttentionShape:
        family = config.model_type.removesuffix("_swiftkv")
        tp = get_tensor_model_parallel_world_size()
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
        if heads % tp or kv_heads % tp:
            raise ValueError(
                f"SwiftKV in vLLM needs num_attention_heads ({heads}) and num_key_value_heads ({kv_heads}) divisible "
                f"by the tensor-parallel size ({tp}); use a tensor-parallel size that divides both."
            )
        bias = bool(getattr(config, "attention_bias", False))
        return cls(
            hidden=config.hidden_size,
            heads=heads // tp,
            kv_heads=kv_heads // tp,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            qkv_bias=True if family == "qwen2" else bias,
            o_bias=False if family == "qwen2" else bias,
            qk_norm=family == "qwen3",
        )


def sliding_window(config, layer_idx: int) -> int | None:
    """The window of `layer_idx`: from `layer_types` when the config has them, else the config's own (Mistral)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return config.sliding_window if layer_types[layer_idx] == "sliding_attention" else None
    return getattr(config, "sliding_window", None)


def per_head_norm(norm: RMSNorm | None, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Qwen3's per-head RMSNorm on [T, heads*Dh] (identity for families without it)."""
    if norm is None:
        return x
    return norm(x.view(*x.shape[:-1], -1, head_dim)).view(x.shape)


class SwiftKVCacheWriter(Attention):
    """The KV-cache entry of one AcrossKV group: written once per token, read by the group's layers.

    It never attends itself; its layer name is the `kv_sharing_target_layer_name` of the group's layers.
    """

    def write(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store K, V [T, Hkv*Dh] (RoPE applied) at this step's slots."""
        key = key.view(-1, self.num_kv_heads, self.head_size)
        value = value.view(-1, self.num_kv_heads, self.head_size_v)
        if self.attn_backend.forward_includes_kv_cache_update:
            # This backend writes the cache only inside its attention call: run one and drop its output.
            self.forward(key.new_zeros(key.shape[0], self.num_heads * self.head_size), key, value)
        elif self.use_direct_call:
            unified_kv_cache_update(key, value, self.layer_name)
        else:
            torch.ops.vllm.unified_kv_cache_update(key, value, _encode_layer_name(self.layer_name))


class BaseAttention(nn.Module):
    """Layers < L: the family's attention as vLLM runs it (fused qkv_proj, own cache entry)."""

    def __init__(self, config, shape: AttentionShape, cache_config, quant_config, layer_idx: int, prefix: str):
        super().__init__()
        self.shape = shape
        tp = get_tensor_model_parallel_world_size()
        self.qkv_proj = QKVParallelLinear(
            shape.hidden,
            shape.head_dim,
            shape.heads * tp,
            shape.kv_heads * tp,
            bias=shape.qkv_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = _o_proj(shape, quant_config, prefix)
        self.q_norm = RMSNorm(shape.head_dim, eps=config.rms_norm_eps) if shape.qk_norm else None
        self.k_norm = RMSNorm(shape.head_dim, eps=config.rms_norm_eps) if shape.qk_norm else None
        self.rotary_emb = _rope(config, shape)
        self.attn = _attention(Attention, config, shape, cache_config, quant_config, layer_idx, f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        q_size, kv_size = self.shape.heads * self.shape.head_dim, self.shape.kv_heads * self.shape.head_dim
        q, k, v = self.qkv_proj(hidden)[0].split([q_size, kv_size, kv_size], dim=-1)
        q = per_head_norm(self.q_norm, q, self.shape.head_dim)
        k = per_head_norm(self.k_norm, k, self.shape.head_dim)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v))[0]


class SwiftKVAttention(nn.Module):
    """Layers >= L: queries from `q_proj_swiftkv`, K/V read from the group's writer; leaders also fill it.

    The layer's original q/k/v projections are not built (the checkpoint keeps them for the teacher; the loader
    skips them). Qwen3: SwiftKV queries use the layer's own `q_norm`, SwiftKV keys the leader's `k_norm`, as in
    swiftkv's HF model.
    """

    def __init__(
        self,
        config,
        shape: AttentionShape,
        cache_config,
        quant_config,
        layer_idx: int,
        prefix: str,
        writer: SwiftKVCacheWriter,
        is_leader: bool,
    ):
        super().__init__()
        self.shape = shape
        tp = get_tensor_model_parallel_world_size()
        q_out, kv_out = shape.heads * tp * shape.head_dim, shape.kv_heads * tp * shape.head_dim
        self.q_proj_swiftkv = _column(shape.hidden, q_out, shape.qkv_bias, quant_config, f"{prefix}.q_proj_swiftkv")
        self.o_proj = _o_proj(shape, quant_config, prefix)
        self.q_norm = RMSNorm(shape.head_dim, eps=config.rms_norm_eps) if shape.qk_norm else None
        self.rotary_emb = _rope(config, shape)
        if is_leader:
            self.k_proj_swiftkv = _column(
                shape.hidden, kv_out, shape.qkv_bias, quant_config, f"{prefix}.k_proj_swiftkv"
            )
            self.v_proj_swiftkv = _column(
                shape.hidden, kv_out, shape.qkv_bias, quant_config, f"{prefix}.v_proj_swiftkv"
            )
            self.k_norm = RMSNorm(shape.head_dim, eps=config.rms_norm_eps) if shape.qk_norm else None
            self.swiftkv_attn = writer  # a submodule of its leader only, so its (scale) parameters load once
        self.attn = _attention(
            Attention,
            config,
            shape,
            cache_config,
            quant_config,
            layer_idx,
            f"{prefix}.attn",
            kv_sharing_target_layer_name=writer.layer_name,
        )

    def write_key_values(self, positions: torch.Tensor, x: torch.Tensor) -> None:
        """Leader only: the group's K/V from x = norm_swiftkv(h_L) [T, D], for every token, into its cache entry."""
        k = per_head_norm(self.k_norm, self.k_proj_swiftkv(x)[0], self.shape.head_dim)  # [T, Hkv*Dh]
        v = self.v_proj_swiftkv(x)[0]
        k, _ = self.rotary_emb(positions, k, None)  # RoPE is per head: rotating K as a "query" is the same op
        self.swiftkv_attn.write(k, v)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Kept rows only [K, D] -> [K, D]; attends to every cached token of the group."""
        q = per_head_norm(self.q_norm, self.q_proj_swiftkv(hidden)[0], self.shape.head_dim)
        q, _ = self.rotary_emb(positions, q, None)
        return self.o_proj(self.attn(q, None, None))[0]


class DecoderLayer(nn.Module):
    """Pre-norm block shared by the four families (vLLM's fused residual-add RMSNorm, SiLU-gated MLP)."""

    def __init__(self, config, self_attn: nn.Module, quant_config, prefix: str):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = LlamaMLP(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act,
            quant_config=quant_config,
            bias=bool(getattr(config, "mlp_bias", False)),
            prefix=f"{prefix}.mlp",
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions=positions, hidden=hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


def _build_layers(config, layout: SwiftKVLayout, cache_config, quant_config, prefix: str) -> list[DecoderLayer]:
    """Layers 0..N-1, their attentions registered with vLLM in this order: layers < L, the writers, layers >= L.

    vLLM needs a KV-sharing target registered before the layers that share it, and serves fast prefill to the
    trailing run of sharing layers only: so every writer comes before layer L and every layer >= L shares.
    """
    shape = AttentionShape.of(config)

    def attn_prefix(layer_idx: int) -> str:
        return f"{prefix}.layers.{layer_idx}.self_attn"

    def layer(attn: nn.Module, layer_idx: int) -> DecoderLayer:
        return DecoderLayer(config, attn, quant_config, f"{prefix}.layers.{layer_idx}")

    layers = [
        layer(BaseAttention(config, shape, cache_config, quant_config, i, attn_prefix(i)), i)
        for i in range(layout.num_key_value_layers)
    ]
    writers = {
        leader: _attention(
            SwiftKVCacheWriter, config, shape, cache_config, quant_config, leader, f"{attn_prefix(leader)}.swiftkv_attn"
        )
        for leader in layout.leaders
    }
    for i in range(layout.num_key_value_layers, layout.num_layers):
        leader = layout.leader_of(i)
        attn = SwiftKVAttention(
            config, shape, cache_config, quant_config, i, attn_prefix(i), writers[leader], is_leader=leader == i
        )
        layers.append(layer(attn, i))
    return layers


class SwiftKVModel(nn.Module):
    """Embedding, layers 0..N-1, `norm_swiftkv` and the final norm; the SwiftKV forward (module docstring)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        if get_pp_group().world_size > 1:
            raise ValueError("SwiftKV models in vLLM do not support pipeline parallelism yet; use tensor parallelism.")
        self.config, self.layout = config, SwiftKVLayout.of(config)
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, quant_config=quant_config)
        layers = _build_layers(config, self.layout, cache_config, quant_config, prefix)
        self.layers = nn.ModuleList(layers)
        self.norm_swiftkv = RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if self.layout.skips else None
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.fast_prefill = bool(cache_config.kv_sharing_fast_prefill) and self.layout.skips
        # (rows into layer 0, rows into layer L) of recent forwards: shows the skipping (tests, `row_counts`).
        self.row_counts: deque[tuple[int, int]] = deque(maxlen=256)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds  # [T, D]
        residual = None
        for layer in self.layers[: self.layout.num_key_value_layers]:
            hidden, residual = layer(positions, hidden, residual)
        if not self.layout.skips:
            self.row_counts.append((hidden.shape[0], 0))
            return self.norm(hidden, residual)[0]
        h_l = hidden + residual  # [T, D]: the residual stream entering layer L
        self._write_swiftkv_cache(positions, h_l)
        kept = self._kept_rows()
        rows = h_l if kept is None else h_l[kept[0]]  # [K, D]
        row_positions = positions if kept is None else positions[kept[0]]
        self.row_counts.append((h_l.shape[0], rows.shape[0]))
        hidden, residual = rows, None
        for layer in self.layers[self.layout.num_key_value_layers :]:
            hidden, residual = layer(row_positions, hidden, residual)
        hidden = self.norm(hidden, residual)[0]
        if kept is None:
            return hidden
        # The runner reads hidden states at its logits indices only: scatter the kept rows back to [T, D].
        out = h_l.new_zeros(h_l.shape)
        out[kept[0][: kept[1]]] = hidden[: kept[1]]
        return out

    def _write_swiftkv_cache(self, positions: torch.Tensor, h_l: torch.Tensor) -> None:
        x = self.norm_swiftkv(h_l)  # [T, D]
        for leader in self.layout.leaders:
            self.layers[leader].self_attn.write_key_values(positions, x)

    def _kept_rows(self) -> tuple[torch.Tensor, int] | None:
        """(row indices [K'] padded, K) of the rows the sampler needs, or None when every row must run.

        vLLM attaches them to the metadata of the fast-prefill layers; absent in dummy/profile runs and when fast
        prefill is off.
        """
        if not self.fast_prefill:
            return None
        metadata = get_forward_context().attn_metadata
        if not isinstance(metadata, dict):
            return None
        last = metadata.get(self.layers[-1].self_attn.attn.layer_name)
        if not isinstance(last, KVSharingFastPrefillMetadata) or last.logits_indices_padded is None:
            return None
        return last.logits_indices_padded, int(last.num_logits_indices)


class SwiftKVForCausalLM(nn.Module):
    """`*SwiftKVForCausalLM` checkpoints (swiftkv convert/distill, Snowflake's) in vLLM."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = SwiftKVModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(
            config.vocab_size,
            config.hidden_size,
            quant_config=vllm_config.quant_config,
            prefix=maybe_prefix(prefix, "lm_head"),
        )
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_swiftkv_weights(self, weights)


class LlamaSwiftKVForCausalLM(SwiftKVForCausalLM):
    pass


class MistralSwiftKVForCausalLM(SwiftKVForCausalLM):
    pass


class Qwen2SwiftKVForCausalLM(SwiftKVForCausalLM):
    pass


class Qwen3SwiftKVForCausalLM(SwiftKVForCausalLM):
    pass


def row_counts(model: nn.Module) -> list[tuple[int, int]]:
    """For `LLM.apply_model(row_counts)`: (rows into layer 0, rows into layer L) of the model's recent forwards."""
    return list(model.model.row_counts)


def clear_row_counts(model: nn.Module) -> None:
    model.model.row_counts.clear()


# HF name -> (vLLM parameter, shard): the fused projections vLLM builds for layers < L and every MLP.
_STACKED = re.compile(r"\.(q|k|v|gate|up)_proj\.(weight|bias)$")
_SHARD = {"q": ("qkv_proj", "q"), "k": ("qkv_proj", "k"), "v": ("qkv_proj", "v"), "gate": ("gate_up_proj", 0)}
_SHARD["up"] = ("gate_up_proj", 1)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _skipped(name: str, layout: SwiftKVLayout, tied: bool) -> bool:
    """Checkpoint tensors this layout does not use (the teacher's projections of layers >= L, RoPE buffers...)."""
    if "rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight"):
        return True
    layer = _LAYER.match(name)
    if layer and int(layer.group(1)) >= layout.num_key_value_layers:
        if re.search(r"\.self_attn\.[qkv]_proj\.", name):
            return True  # the teacher's projections
        # qwen3: a non-leader's k_norm only normalised its own (teacher) keys; SwiftKV keys use the leader's
        return ".self_attn.k_norm." in name and layout.leader_of(int(layer.group(1))) != int(layer.group(1))
    if not layout.skips:  # base mode (swiftkv false): the student's parameters are not built
        return "_swiftkv" in name
    return False


def load_swiftkv_weights(model: SwiftKVForCausalLM, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Load a HF-format SwiftKV checkpoint; a missing or unexpected SwiftKV tensor is an error that names it."""
    layout, tied = model.model.layout, bool(model.config.tie_word_embeddings)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in weights:
        if _skipped(name, layout, tied):
            continue
        stacked = _STACKED.search(name) if "_swiftkv" not in name else None
        shard = None
        if stacked:
            fused, shard = _SHARD[stacked.group(1)]
            name = name[: stacked.start()] + f".{fused}.{stacked.group(2)}"
        param = params.get(name)
        if param is None:
            unexpected.append(name)
            continue
        loader = getattr(param, "weight_loader", default_weight_loader)
        loader(param, tensor) if shard is None else loader(param, tensor, shard)
        loaded.add(name)
    missing = sorted(n for n in params if n not in loaded and not n.endswith("_scale"))
    if missing or unexpected:
        problems = [f"missing {n}" for n in missing] + [f"unexpected {n}" for n in unexpected]
        raise ValueError(
            f"Checkpoint does not match its SwiftKV config (num_key_value_layers={layout.num_key_value_layers}, "
            f"key_value_group_size={layout.group_size}): {'; '.join(problems[:8])}"
            + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
            + ". Write checkpoints with `swiftkv convert` / `swiftkv distill`, or fix config.json."
        )
    return loaded


def _column(in_features: int, out_features: int, bias: bool, quant_config, prefix: str) -> ColumnParallelLinear:
    return ColumnParallelLinear(in_features, out_features, bias=bias, quant_config=quant_config, prefix=prefix)


def _o_proj(shape: AttentionShape, quant_config, prefix: str) -> RowParallelLinear:
    tp = get_tensor_model_parallel_world_size()
    return RowParallelLinear(
        shape.heads * tp * shape.head_dim,
        shape.hidden,
        bias=shape.o_bias,
        quant_config=quant_config,
        prefix=f"{prefix}.o_proj",
    )


def _rope(config, shape: AttentionShape) -> nn.Module:
    return get_rope(
        shape.head_dim,
        max_position=config.max_position_embeddings,
        rope_parameters=getattr(config, "rope_parameters", None),
        is_neox_style=True,
    )


def _attention(
    cls: type[Attention],
    config,
    shape: AttentionShape,
    cache_config: CacheConfig | None,
    quant_config,
    layer_idx: int,
    prefix: str,
    **kwargs,
) -> Attention:
    return cls(
        shape.heads,
        shape.head_dim,
        shape.head_dim**-0.5,
        num_kv_heads=shape.kv_heads,
        cache_config=cache_config,
        quant_config=quant_config,
        per_layer_sliding_window=sliding_window(config, layer_idx),
        prefix=prefix,
        **kwargs,
    )
