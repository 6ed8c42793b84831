"""What SwiftKV should save, from the config alone: prefill FLOPs and KV-cache bytes relative to the base model.

Shapes: T prompt tokens, N layers, L = `num_key_value_layers`, g = `key_value_group_size`, D hidden size.
"""

from __future__ import annotations


def _dims(config) -> dict[str, int]:
    """Matrix sizes of one decoder layer: hidden D, query width H*Dh, key/value width Hkv*Dh, MLP width I."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "hidden": config.hidden_size,
        "q": config.num_attention_heads * head_dim,
        "kv": config.num_key_value_heads * head_dim,
        "mlp": config.intermediate_size,
        "vocab": config.vocab_size,
    }


def _layer_flops(d: dict[str, int], tokens: int, kv_tokens: int, pairs: float) -> float:
    """FLOPs of one layer: q,o,MLP for `tokens`, k,v projections for `kv_tokens`, attention over `pairs`.

    A matmul [M, K] x [K, N] costs 2*M*K*N. `pairs` = query-key pairs; each costs Q.K (2*H*Dh) plus P.V (2*H*Dh).
    """
    q_o_mlp = 2 * tokens * (2 * d["hidden"] * d["q"] + 3 * d["hidden"] * d["mlp"])  # q, o, gate/up/down
    k_v = 2 * kv_tokens * 2 * d["hidden"] * d["kv"]
    return q_o_mlp + k_v + 4 * pairs * d["q"]


def prefill_flops(config, prompt_len: int, swiftkv: bool) -> float:
    """FLOPs of `model(ids, logits_to_keep=1)` for a prompt of T tokens, without a cache (what generate runs).

    Base: every layer runs all T tokens, causal attention over T(T+1)/2 pairs. SwiftKV: layers < L as the base;
    each later layer runs q,o,MLP for the last token only, attending all T keys; the K/V projections of the
    (N-L)/g group leaders run for all T tokens (the cache needs them). Both: lm_head for 1 token.
    """
    d, t = _dims(config), prompt_len
    n_layers = config.num_hidden_layers
    causal_pairs = t * (t + 1) / 2
    lm_head = 2 * d["hidden"] * d["vocab"]
    if not swiftkv:
        return n_layers * _layer_flops(d, t, t, causal_pairs) + lm_head
    n_kv, group = config.num_key_value_layers, config.key_value_group_size
    early = n_kv * _layer_flops(d, t, t, causal_pairs)
    leaders_kv = (n_layers - n_kv) // group * _layer_flops(d, 0, t, 0)
    late = (n_layers - n_kv) * _layer_flops(d, 1, 0, t)  # one query, T keys
    return early + leaders_kv + late + lm_head


def theoretical_prefill_flops_ratio(config, prompt_len: int) -> float:
    """SwiftKV prefill FLOPs / base prefill FLOPs; tends to L/N (from above) as the prompt grows."""
    return prefill_flops(config, prompt_len, swiftkv=True) / prefill_flops(config, prompt_len, swiftkv=False)


def kv_bytes_ratio(config) -> float:
    """SwiftKV cache bytes / base cache bytes: one entry per layer < L plus one per AcrossKV group."""
    n_layers, n_kv = config.num_hidden_layers, config.num_key_value_layers
    return (n_kv + (n_layers - n_kv) / config.key_value_group_size) / n_layers
