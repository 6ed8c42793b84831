"""One SwiftKV causal LM for vLLM over vLLM's own building blocks, for llama, mistral, qwen2 and qwen3.

The forward (shapes: T tokens scheduled in this step, K kept rows, D hidden, Hkv key/value heads, Dh head dim):

    h = layers[0:L](embed(ids))                          # compiled part 1 (`SwiftKVPrefix`), every token:
    x = norm_swiftkv(h)                                  #   [T, D]; caches of layers 0..L-1 written
    K|V of all G groups = kv_proj_swiftkv(x)             #   one GEMM [T, 2*G*Hkv*Dh]; k_norm (qwen3); one RoPE call
                          -> each group's written ONCE into its cache entry (a `SwiftKVCacheWriter`)
    h_keep = h[rows the sampler needs]                   # eager: [K, D], one row per request at prefill
    h_keep = layers[L:N](h_keep)                         # compiled part 2 (`SwiftKVSuffix`): q_proj_swiftkv queries,
    return norm(h_keep) scattered back into [T, D]       #   K/V from the group's writer

How it maps on vLLM 0.32 (no patch of its runner): every attention of a layer >= L is an `Attention` with
`kv_sharing_target_layer_name` = its group's writer, so the engine allocates L + (N-L)/g cache entries (AcrossKV
memory is real). The writers are built before layers L..N-1, so those layers are the trailing run of KV-sharing
layers that `cache_config.kv_sharing_fast_prefill` serves with metadata for the kept rows only (any backend), and
the model reads the kept rows from that metadata, as vLLM's Gemma3n does. With fast prefill off every row runs
every layer (the full SwiftKV forward: same tokens, no saving).

Tensor parallel splits or replicates K/V heads as vLLM's `QKVParallelLinear` (`SwiftKVKeyValues`); pipeline parallel
gives each stage its layers and its groups' K/V, x travelling from the stage holding L to later ones (`SwiftKVModel`).
"""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.distributed.utils import get_pp_indices
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.attention.attention import unified_kv_cache_update
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsPP, SupportsQuant
from vllm.model_executor.models.llama import LlamaMLP
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    WeightsMapper,
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors
from vllm.utils.torch_utils import _encode_layer_name
from vllm.v1.attention.backends.utils import KVSharingFastPrefillMetadata

from swiftkv_vllm.configs import PipelineStage, SwiftKVLayout, check_parallel_layout

COUNT_ROWS_ENV = "SWIFTKV_VLLM_COUNT_ROWS"


@dataclass(frozen=True)
class AttentionShape:
    """What differs between the four families' attention, read from the HF config (as transformers builds it)."""

    hidden: int
    total_heads: int  # query heads of the model
    total_kv_heads: int  # key/value heads of the model
    heads: int  # query heads, this tensor-parallel rank
    kv_heads: int  # key/value heads, this rank: a replica of one head when tp > total_kv_heads
    head_dim: int
    qkv_bias: bool  # qwen2: always; llama/qwen3: attention_bias; mistral: never
    o_bias: bool
    qk_norm: bool  # qwen3: per-head RMSNorm on queries and keys

    @classmethod
    def of(cls, config) -> AttentionShape:
        family = config.model_type.removesuffix("_swiftkv")
        tp = get_tensor_model_parallel_world_size()
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
        bias = bool(getattr(config, "attention_bias", False))
        return cls(
            hidden=config.hidden_size,
            total_heads=heads,
            total_kv_heads=kv_heads,
            heads=heads // tp,
            kv_heads=max(1, kv_heads // tp),  # QKVParallelLinear's rule (check_parallel_layout: tp | kv or kv | tp)
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            qkv_bias=True if family == "qwen2" else bias,
            o_bias=False if family == "qwen2" else bias,
            qk_norm=family == "qwen3",
        )

    @property
    def kv_head_replicas(self) -> int:
        """Ranks holding each K/V head: tp / total_kv_heads when tp > total_kv_heads, else 1."""
        return max(1, get_tensor_model_parallel_world_size() // self.total_kv_heads)


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

    def write(self, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Store K, V [T, Hkv*Dh] (RoPE applied) at this step's slots; returns the op's dependency token.

        No layer of this compiled part reads the entry (the group's layers read it in the other part), so the caller
        must return the token from its compiled forward, or the compiler could drop the write as dead code.
        """
        key = key.reshape(-1, self.num_kv_heads, self.head_size)
        value = value.reshape(-1, self.num_kv_heads, self.head_size_v)
        if self.attn_backend.forward_includes_kv_cache_update:
            # This backend writes the cache only inside its attention call: run one and drop its output.
            return self.forward(key.new_zeros(key.shape[0], self.num_heads * self.head_size), key, value)
        if self.use_direct_call:
            return unified_kv_cache_update(key, value, self.layer_name)
        return torch.ops.vllm.unified_kv_cache_update(key, value, _encode_layer_name(self.layer_name))


class BaseAttention(nn.Module):
    """Layers < L: the family's attention as vLLM runs it (fused qkv_proj, own cache entry)."""

    def __init__(self, config, shape: AttentionShape, cache_config, quant_config, layer_idx: int, prefix: str):
        super().__init__()
        self.shape = shape
        self.qkv_proj = QKVParallelLinear(
            shape.hidden,
            shape.head_dim,
            shape.total_heads,
            shape.total_kv_heads,
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
    """Layers >= L: queries from `q_proj_swiftkv`, K/V read from the group's writer.

    The layer's original q/k/v projections are not built (the checkpoint keeps them for the teacher; the loader
    skips them). The leaders' `k_proj_swiftkv`/`v_proj_swiftkv` live stacked in `SwiftKVKeyValues`; a leader keeps
    its writer and (qwen3) its `k_norm`, which normalises the group's SwiftKV keys, as in swiftkv's HF model.
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
        self.q_proj_swiftkv = ColumnParallelLinear(
            shape.hidden,
            shape.total_heads * shape.head_dim,
            bias=shape.qkv_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.q_proj_swiftkv",
        )
        self.o_proj = _o_proj(shape, quant_config, prefix)
        self.q_norm = RMSNorm(shape.head_dim, eps=config.rms_norm_eps) if shape.qk_norm else None
        self.rotary_emb = _rope(config, shape)
        if is_leader:
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

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Kept rows only [K, D] -> [K, D]; attends to every cached token of the group."""
        q = per_head_norm(self.q_norm, self.q_proj_swiftkv(hidden)[0], self.shape.head_dim)
        q, _ = self.rotary_emb(positions, q, None)
        return self.o_proj(self.attn(q, None, None))[0]


class SwiftKVKeyValues(nn.Module):
    """The K/V of every AcrossKV group from x = norm_swiftkv(h_L): one GEMM, one RoPE, one cache write per group.

    `kv_proj_swiftkv` stacks the leaders' `k_proj_swiftkv` then their `v_proj_swiftkv` (shards 0..G-1 and G..2G-1,
    each [Hkv*Dh, D], split per tensor-parallel rank as vLLM stacks q/k/v into `qkv_proj`). Each shard's size is
    per-rank heads x tp, `QKVParallelLinear`'s convention: when tp > Hkv the loader first repeats each head
    `kv_head_replicas` times (`replicate_kv_heads`: the weight, bias and per-row quantization scales alike), so rank r
    loads head r // replicas, the head its layers' caches hold, as `qkv_proj` loads it for layers < L.
    """

    def __init__(self, leaders: list[SwiftKVAttention], quant_config, prefix: str):
        super().__init__()
        shape = self.shape = leaders[0].shape  # every layer of the model has the same attention shape
        self.groups = len(leaders)
        tp = get_tensor_model_parallel_world_size()
        self.kv_proj_swiftkv = MergedColumnParallelLinear(
            shape.hidden,
            [shape.kv_heads * tp * shape.head_dim] * (2 * self.groups),
            bias=shape.qkv_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.kv_proj_swiftkv",
        )
        self.rotary_emb = leaders[0].rotary_emb
        self.k_norms = [leader.k_norm for leader in leaders]  # plain list: the leaders own (and load) them
        self.writers = [leader.swiftkv_attn for leader in leaders]

    def replicate_kv_heads(self, name: str, tensor: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
        """Checkpoint tensor `name` of a leader's K or V projection, for `param` of `kv_proj_swiftkv`: each of its Hkv
        heads repeated `kv_head_replicas` times along the parameter's output dim, where the weight loader cuts each
        rank's slice. That covers the weight, the bias and every per-output-row quantization tensor (per-channel or
        group scales, zero points, weights packed along either dim). A parameter without an output dim (per-tensor
        scales, one per shard) takes the tensor as it is on every rank."""
        replicas, heads = self.shape.kv_head_replicas, self.shape.total_kv_heads
        dim = getattr(param, "output_dim", None)
        if replicas == 1 or dim is None:
            return tensor
        if tensor.dim() <= dim or tensor.shape[dim] % heads:
            raise ValueError(
                f"Checkpoint tensor {name} {tuple(tensor.shape)} cannot be replicated per K/V head for tensor "
                f"parallelism (each of the {heads} K/V heads on {replicas} ranks): its dim {dim} does not split into "
                f"{heads} heads (e.g. block-quantized scales with blocks wider than a head). Use a tensor-parallel "
                "size that divides the K/V heads."
            )
        per_head = tensor.unflatten(dim, (heads, -1))  # [..., Hkv, rows per head, ...]
        return per_head.repeat_interleave(replicas, dim=dim).flatten(dim, dim + 1)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [T, D] -> every group's cache entry written; returns the writes' dependency tokens (see `write`)."""
        kv_size = self.shape.kv_heads * self.shape.head_dim
        keys, values = self.kv_proj_swiftkv(x)[0].split(self.groups * kv_size, dim=-1)  # [T, G*Hkv*Dh] each
        if self.k_norms[0] is not None:  # qwen3: each leader's own k_norm on its group's keys
            groups = zip(self.k_norms, keys.split(kv_size, dim=-1), strict=True)
            keys = torch.cat([per_head_norm(norm, k, self.shape.head_dim) for norm, k in groups], dim=-1)
        keys, _ = self.rotary_emb(positions, keys, None)  # RoPE is per head: all groups' keys as one "query"
        groups = zip(self.writers, keys.split(kv_size, dim=-1), values.split(kv_size, dim=-1), strict=True)
        return tuple(writer.write(k, v) for writer, k, v in groups)


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


def _build_layers(
    config, stage: PipelineStage, cache_config, quant_config, prefix: str
) -> list[DecoderLayer | PPMissingLayer]:
    """Layers 0..N-1 (`PPMissingLayer` outside this pipeline stage), their attentions registered with vLLM in this
    order: the stage's layers < L, its groups' writers, its layers >= L.

    vLLM needs a KV-sharing target registered before the layers that share it, and serves fast prefill to the
    trailing run of sharing layers only: so every writer comes before layer L and every layer >= L shares.
    """
    shape, layout = AttentionShape.of(config), stage.layout

    def attn_prefix(layer_idx: int) -> str:
        return f"{prefix}.layers.{layer_idx}.self_attn"

    def layer(attn: nn.Module, layer_idx: int) -> DecoderLayer:
        return DecoderLayer(config, attn, quant_config, f"{prefix}.layers.{layer_idx}")

    layers: list[DecoderLayer | PPMissingLayer] = [PPMissingLayer() for _ in range(stage.start)]
    layers += [
        layer(BaseAttention(config, shape, cache_config, quant_config, i, attn_prefix(i)), i) for i in stage.base_layers
    ]
    writers = {
        leader: _attention(
            SwiftKVCacheWriter, config, shape, cache_config, quant_config, leader, f"{attn_prefix(leader)}.swiftkv_attn"
        )
        for leader in stage.leaders
    }
    for i in stage.swiftkv_layers:
        leader = layout.leader_of(i)
        attn = SwiftKVAttention(
            config, shape, cache_config, quant_config, i, attn_prefix(i), writers[leader], is_leader=leader == i
        )
        layers.append(layer(attn, i))
    return layers + [PPMissingLayer() for _ in range(stage.end, layout.num_layers)]


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0, "intermediate_tensors": 0, "inputs_embeds": 0})
class SwiftKVPrefix(nn.Module):
    """Compiled part 1, every scheduled token: the stage's layers < L, then (stage holding L) `norm_swiftkv` and the
    K/V of the stage's groups.

    Returns, by stage: (h_L, x, *write tokens) where it holds layer L; (*write tokens) after L (x came from the
    previous stage); (hidden, residual) to send on before L; (norm(h_N),) on the last stage of a model without
    SwiftKV layers (L = N). All [T, D].
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", model: SwiftKVModel):
        super().__init__()
        self.stage, self.embed_tokens = model.stage, model.embed_tokens
        self.layers = nn.ModuleList(model.layers[i] for i in model.stage.base_layers)
        self.norm_swiftkv, self.key_values, self.norm = model.norm_swiftkv, model.key_values, model.norm

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        if self.stage.receives_x:
            return self.key_values(positions, intermediate_tensors["swiftkv_x"])
        if self.stage.first:
            hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [T, D]
            residual = None
        else:
            hidden, residual = intermediate_tensors["hidden_states"], intermediate_tensors["residual"]
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        if self.stage.computes_x:
            x, h_l = self.norm_swiftkv(hidden, residual)  # h_L = hidden + residual, x = norm_swiftkv(h_L): [T, D]
            return h_l, x, *self.key_values(positions, x)
        if self.stage.last:
            return (self.norm(hidden, residual)[0],)
        return hidden, residual


@support_torch_compile(dynamic_arg_dims={"positions": 0, "hidden": 0, "residual": 0})
class SwiftKVSuffix(nn.Module):
    """Compiled part 2, the kept rows only: the stage's layers >= L, [K, D] -> (norm(h_N),) on the last stage, else
    (hidden, residual) to send on. `residual` is None on the stage holding L (its input is h_L itself)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", model: SwiftKVModel):
        super().__init__()
        self.stage, self.norm = model.stage, model.norm
        self.layers = nn.ModuleList(model.layers[i] for i in model.stage.swiftkv_layers)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        if self.stage.last:
            return (self.norm(hidden, residual)[0],)
        return hidden, residual


class SwiftKVModel(nn.Module):
    """Embedding, layers 0..N-1, `norm_swiftkv` and the final norm; the SwiftKV forward (module docstring).

    Compiled like vLLM's Gemma3n: two compiled parts (`SwiftKVPrefix`, `SwiftKVSuffix`) around the row gather,
    which runs eagerly between them on static buffers, so a piecewise CUDA graph of either part never freezes
    which rows are kept. The parts hold references to the modules registered here first, so parameter names stay
    the checkpoint's (`model.layers.{i}...`).

    Pipeline parallel: each stage builds only its layers (`get_pp_indices`, as vLLM's `make_layers`) and its groups'
    K/V; the intermediate tensors between stages keep vLLM's fixed length T (the runner copies them into buffers of
    `max_num_batched_tokens` rows). A stage after L scatters its kept rows back into the full-length residual stream
    and the next stage gathers the same rows again (both read them from the same fast-prefill metadata); rows not
    kept carry stale values that no stage reads.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        pp = get_pp_group()
        check_parallel_layout(config, get_tensor_model_parallel_world_size(), pp.world_size)
        self.config, self.layout = config, SwiftKVLayout.of(config)
        self.stage = stage = PipelineStage(
            self.layout, *get_pp_indices(config.num_hidden_layers, pp.rank_in_group, pp.world_size)
        )
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        if stage.first or (config.tie_word_embeddings and stage.last):
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, quant_config=quant_config)
        else:
            self.embed_tokens = PPMissingLayer()
        self.layers = nn.ModuleList(_build_layers(config, stage, cache_config, quant_config, prefix))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if stage.last else PPMissingLayer()
        self.norm_swiftkv = (
            RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if stage.computes_x else PPMissingLayer()
        )
        self.key_values = None
        if stage.leaders:
            leaders = [self.layers[i].self_attn for i in stage.leaders]
            self.key_values = SwiftKVKeyValues(leaders, quant_config, prefix)
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            stage.intermediate_keys, config.hidden_size
        )
        from vllm.compilation.backends import set_model_tag  # as gemma3n: a compile-cache folder per part

        with set_model_tag("swiftkv_prefix"):
            self.prefix = SwiftKVPrefix(vllm_config=vllm_config, prefix=f"{prefix}.prefix", model=self)
        with set_model_tag("swiftkv_suffix"):
            self.suffix = SwiftKVSuffix(vllm_config=vllm_config, prefix=f"{prefix}.suffix", model=self)
        self.fast_prefill = bool(cache_config.kv_sharing_fast_prefill) and bool(stage.swiftkv_layers)
        if self.fast_prefill:  # static inputs of the suffix (CUDA graphs replay from fixed addresses)
            rows = vllm_config.scheduler_config.max_num_batched_tokens
            device, dtype = self.layers[stage.end - 1].input_layernorm.weight.device, vllm_config.model_config.dtype
            self.kept_positions = torch.zeros(rows, dtype=torch.int64, device=device)
            self.kept_hidden = torch.zeros(rows, config.hidden_size, dtype=dtype, device=device)
            if stage.receives_x:
                self.kept_residual = torch.zeros(rows, config.hidden_size, dtype=dtype, device=device)
        # (rows this stage received, rows its layers >= L ran) per forward, only when asked: a debug switch, off the
        # hot path. On the first stage: rows into layer 0 and rows into layer L.
        self.row_counts: deque[tuple[int, int]] | None = deque(maxlen=256) if count_rows_requested() else None

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        out = self.prefix(input_ids, positions, intermediate_tensors, inputs_embeds)
        if not self.stage.swiftkv_layers:  # only layers < L here (or no SwiftKV layer at all)
            self._count(positions.shape[0], 0)
            return out[0] if self.stage.last else IntermediateTensors({"hidden_states": out[0], "residual": out[1]})
        if self.stage.computes_x:  # the write tokens (out[2:]) kept the writes alive
            hidden, residual, x = out[0], None, out[1]  # h_L, x [T, D]
        else:
            hidden, residual = intermediate_tensors["hidden_states"], intermediate_tensors["residual"]
            x = intermediate_tensors["swiftkv_x"]
        out = self._run_kept_rows(positions, hidden, residual)
        if self.stage.last:
            return out[0]
        return IntermediateTensors({"hidden_states": out[0], "residual": out[1], "swiftkv_x": x})

    def _run_kept_rows(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:
        """The suffix on the rows the sampler needs, its outputs written back into full-length [T, D] tensors."""
        num_tokens = hidden.shape[0]
        kept = self._kept_rows(num_tokens)
        if kept is None:  # every row runs every layer: decode, fast prefill off, dummy and capture runs
            self._count(num_tokens, num_tokens)
            return self.suffix(positions, hidden, residual)
        rows, count = kept  # [K'] padded row indices, the first `count` real
        self._count(num_tokens, rows.shape[0])
        kept_positions = torch.index_select(positions, 0, rows, out=self.kept_positions[: rows.shape[0]])
        kept_hidden = torch.index_select(hidden, 0, rows, out=self.kept_hidden[: rows.shape[0]])
        kept_residual = None
        if residual is not None:  # a stage after L: the previous stage scattered its kept rows into the stream
            kept_residual = torch.index_select(residual, 0, rows, out=self.kept_residual[: rows.shape[0]])
        out = self.suffix(kept_positions, kept_hidden, kept_residual)  # [K', D] each
        # The runner reads hidden states at its logits indices only, and the next stage these rows only: write the
        # kept rows back into full-length [T, D] tensors (h_L's / the received stream's rows, in place).
        canvases = [hidden]
        if len(out) == 2:  # not the last stage: the residual stream goes on too (the stage holding L starts it)
            canvases.append(torch.zeros_like(hidden) if residual is None else residual)
        for canvas, rows_out in zip(canvases, out, strict=True):
            canvas.index_put_((rows[:count],), rows_out[:count])  # rows: int32
        return tuple(canvases)

    def _kept_rows(self, num_tokens: int) -> tuple[torch.Tensor, int] | None:
        """(row indices [K'] padded, K real) of the rows the sampler needs, or None when every row must run.

        vLLM attaches them to the metadata of the fast-prefill layers; absent in dummy/profile/capture runs and when
        fast prefill is off. Neither needs a host sync: a tensor already on the device and a Python int.
        """
        if not self.fast_prefill:
            return None
        metadata = get_forward_context().attn_metadata
        if not isinstance(metadata, dict):
            return None
        last = metadata.get(self.layers[self.stage.end - 1].self_attn.attn.layer_name)
        if not isinstance(last, KVSharingFastPrefillMetadata) or last.logits_indices_padded is None:
            return None
        if last.num_logits_indices == num_tokens:  # every row kept (pure decode): no gather
            return None
        return last.logits_indices_padded, last.num_logits_indices

    def _count(self, rows_in: int, rows_after_l: int) -> None:
        if self.row_counts is not None:
            self.row_counts.append((rows_in, rows_after_l))


class SwiftKVForCausalLM(nn.Module, SupportsPP, SupportsQuant):
    """`*SwiftKVForCausalLM` checkpoints (swiftkv convert/distill, Snowflake's) in vLLM."""

    # Fused layer -> the checkpoint's layers in it, for the quantization config (`SupportsQuant` hands it over): a
    # fused layer is quantized when all its parts are (their targets / ignore lists), as in vLLM's Llama. The stacked
    # SwiftKV K/V layer (`model.key_values.kv_proj_swiftkv`) holds every leader's k_proj_swiftkv and v_proj_swiftkv.
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
        "kv_proj_swiftkv": ["k_proj_swiftkv", "v_proj_swiftkv"],
    }

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = SwiftKVModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
        if not self.model.stage.last:
            self.lm_head = PPMissingLayer()
            return
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
    ) -> torch.Tensor | IntermediateTensors:
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


def count_rows_requested() -> bool:
    """The row-count debug switch (`SWIFTKV_VLLM_COUNT_ROWS=1` in the engine's environment); off by default."""
    return os.environ.get(COUNT_ROWS_ENV, "0").strip() == "1"


def row_counts(model: nn.Module) -> list[tuple[int, int]]:
    """For `LLM.apply_model(row_counts)`: (rows into layer 0, rows into layer L) of the model's recent forwards."""
    counts = model.model.row_counts
    if counts is None:
        raise RuntimeError(f"Row counts are off: start the engine with {COUNT_ROWS_ENV}=1 in its environment.")
    return list(counts)


def clear_row_counts(model: nn.Module) -> None:
    if model.model.row_counts is not None:
        model.model.row_counts.clear()


# HF name -> (vLLM parameter, shard): the fused projections vLLM builds for layers < L and every MLP. Any parameter of
# them: weight and bias, and whatever a quantization method adds (weight_scale, input_scale, weight_zero_point, ...),
# each loaded by its parameter's own `weight_loader` with the shard, as vLLM's Llama does.
_STACKED = re.compile(r"\.(q|k|v|gate|up)_proj\.(\w+)$")
_SHARD = {"q": ("qkv_proj", "q"), "k": ("qkv_proj", "k"), "v": ("qkv_proj", "v"), "gate": ("gate_up_proj", 0)}
_SHARD["up"] = ("gate_up_proj", 1)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# A leader's SwiftKV K/V projection -> its shard of the stacked `model.key_values.kv_proj_swiftkv` (SwiftKVKeyValues).
_SWIFTKV_KV = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(k|v)_proj_swiftkv\.(\w+)$")
# An attention's own parameter (KV-cache scales), named as vLLM's cache-scale mapping writes it.
_ATTN_PARAM = re.compile(r"^model\.layers\.(\d+)\.self_attn\.attn\.(\w+)$")
# Storage dtypes of pre-quantized weights: a wider float tensor loaded into one would be silently rounded.
_QUANTIZED_DTYPES = (torch.int8, torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2)


def _target(name: str, leaders: list[int]) -> tuple[str, str | int | None]:
    """(vLLM parameter name, shard of a stacked parameter or None) of checkpoint tensor `name`; `leaders`: the
    pipeline stage's AcrossKV leaders, in the order `SwiftKVKeyValues` stacks them."""
    swiftkv_kv = _SWIFTKV_KV.match(name)
    if swiftkv_kv:
        group = leaders.index(int(swiftkv_kv.group(1)))  # ValueError for a non-leader: caught by the caller
        shard = group if swiftkv_kv.group(2) == "k" else len(leaders) + group
        return f"model.key_values.kv_proj_swiftkv.{swiftkv_kv.group(3)}", shard
    stacked = _STACKED.search(name) if "_swiftkv" not in name else None
    if stacked is None:
        return name, None
    fused, shard = _SHARD[stacked.group(1)]
    return name[: stacked.start()] + f".{fused}.{stacked.group(2)}", shard


def _targets(name: str, stage: PipelineStage) -> list[tuple[str, str | int | None]]:
    """Every (vLLM parameter, shard) of pipeline stage `stage` that checkpoint tensor `name` (a tensor of the stage's
    layers) loads into: one, but a leader's KV-cache scale.

    A layer >= L has no cache entry of its own: its group's entry is the leader's writer, which stores K/V with the
    leader's scale, so the writer and every layer of the group (which reads the entry) take that scale. A stage holds
    whole groups (`check_pipeline_stages`), so these are all the leader's stage's.
    """
    layout = stage.layout
    attn = _ATTN_PARAM.match(name)
    if attn is None or int(attn.group(1)) < layout.num_key_value_layers:
        return [_target(name, stage.leaders)]
    leader, param = int(attn.group(1)), attn.group(2)
    readers = [f"model.layers.{i}.self_attn.attn.{param}" for i in range(leader, leader + layout.group_size)]
    return [(f"model.layers.{leader}.self_attn.swiftkv_attn.{param}", None)] + [(r, None) for r in readers]


def _skipped(name: str, layout: SwiftKVLayout, tied: bool) -> bool:
    """Checkpoint tensors this layout does not use (the teacher's projections of layers >= L, RoPE buffers...)."""
    if "rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight"):
        return True
    layer = _LAYER.match(name)
    if layer and int(layer.group(1)) >= layout.num_key_value_layers:
        layer_idx = int(layer.group(1))
        if re.search(r"\.self_attn\.[qkv]_proj\.", name):
            return True  # the teacher's projections, with their quantization scales
        # qwen3: a non-leader's k_norm only normalised its own (teacher) keys; SwiftKV keys use the leader's. A
        # non-leader's KV-cache scale: the group's one cache entry takes the leader's (`_targets`).
        own = ".self_attn.k_norm." in name or _ATTN_PARAM.match(name) is not None
        return own and layout.leader_of(layer_idx) != layer_idx
    if not layout.skips:  # base mode (swiftkv false): the student's parameters are not built
        return "_swiftkv" in name
    return False


def _shard_count(target: str, leaders: list[int]) -> int:
    if ".kv_proj_swiftkv." in target:
        return 2 * len(leaders)
    return 3 if ".qkv_proj." in target else 2 if ".gate_up_proj." in target else 1


def _quant_name_mapping(quant_config) -> tuple[WeightsMapper, tuple[str, ...]]:
    """What vLLM's own loader (`AutoWeightsLoader`) applies for a quantized checkpoint: the quantization method's
    renames (KV-cache scales `...self_attn.k_proj.k_scale`, `...self_attn.kv_scale`, ... -> `...self_attn.attn.k_scale`;
    dropped `.g_idx`), and the suffixes of tensors to ignore when the model has no such parameter (KV-cache scales when
    the engine does not quantize its cache)."""
    if quant_config is None:
        return WeightsMapper(), ()
    mapper = quant_config.get_cache_scale_mapper() | quant_config.get_checkpoint_weight_mapper()
    return mapper, tuple(quant_config._ignore_unexpected_suffixes)


def _check_quantized_storage(name: str, target: str, param: torch.Tensor, tensor: torch.Tensor) -> None:
    """Refuse a full-precision tensor for a pre-quantized weight (the copy would round it to int8 / fp8 silently).

    This happens when the quantization config leaves some of a stacked layer's parts unquantized (e.g. it ignores one
    leader's `k_proj_swiftkv` by name): vLLM quantizes a stacked layer as a whole.
    """
    if param.dtype in _QUANTIZED_DTYPES and tensor.is_floating_point() and tensor.element_size() > 1:
        raise ValueError(
            f"Checkpoint tensor {name} is {tensor.dtype}, but {target} is quantized ({param.dtype}): the quantization "
            "config must quantize every part of a stacked layer alike (q/k/v_proj, gate/up_proj, and every leader's "
            "k_proj_swiftkv and v_proj_swiftkv, which vLLM stacks into one layer)."
        )


def load_swiftkv_weights(model: SwiftKVForCausalLM, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Load a HF-format SwiftKV checkpoint, plain or pre-quantized, into this pipeline stage's parameters; a missing
    or unexpected tensor is an error that names it."""
    stage, tied = model.model.stage, bool(model.config.tie_word_embeddings)
    layout = stage.layout
    mapper, ignorable = _quant_name_mapping(model.quant_config)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    shards: dict[str, set] = {}
    unexpected: list[str] = []
    for checkpoint_name, tensor in weights:
        name = mapper.map_name(checkpoint_name)
        if name is None or _skipped(name, layout, tied) or is_pp_missing_parameter(name, model):  # another stage's
            continue
        try:
            targets = _targets(name, stage)
        except ValueError:  # K/V SwiftKV projection of a layer that leads no group
            targets = [(name, None)]
        for target, shard in targets:
            param = params.get(target)
            if param is None:
                if not name.endswith(ignorable):
                    unexpected.append(checkpoint_name)
                continue
            _check_quantized_storage(checkpoint_name, target, param, tensor)
            value = tensor
            if ".kv_proj_swiftkv." in target:  # tensor parallel: this rank's K/V head, as `qkv_proj` loads it
                value = model.model.key_values.replicate_kv_heads(checkpoint_name, tensor, param)
            loader = getattr(param, "weight_loader", default_weight_loader)
            loader(param, value) if shard is None else loader(param, value, shard)
            loaded.add(target)
            shards.setdefault(target, set()).add(shard)
    # A stacked parameter counts as loaded only with all its shards: else a missing leader would go unnoticed.
    for target, got in shards.items():
        if len(got) < _shard_count(target, stage.leaders):
            loaded.discard(target)
    # An attention's KV-cache scales are optional: without them vLLM's cache quantization uses its default scale.
    missing = sorted(n for n in params if n not in loaded and not re.search(r"\.(swiftkv_)?attn\.\w+$", n))
    if missing or unexpected:
        problems = [f"missing {n}" for n in missing] + [f"unexpected {n}" for n in unexpected]
        raise ValueError(
            f"Checkpoint does not match its SwiftKV config (num_key_value_layers={layout.num_key_value_layers}, "
            f"key_value_group_size={layout.group_size}): {'; '.join(problems[:8])}"
            + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
            + ". Write checkpoints with `swiftkv convert` / `swiftkv distill`, or fix config.json."
        )
    return loaded


def _o_proj(shape: AttentionShape, quant_config, prefix: str) -> RowParallelLinear:
    return RowParallelLinear(
        shape.total_heads * shape.head_dim,
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
