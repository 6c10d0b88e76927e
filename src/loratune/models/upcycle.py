"""Sparse upcycling: a dense Llama-family causal LM turned into a Mixtral mixture-of-experts that computes the same.

Every block's MLP is copied into E identical experts (``gate_up_proj[e] = [W_gate; W_up]``, ``down_proj[e] =
W_down``); attention, norms, embeddings and head are copied as they are. Mixtral's router takes the softmax over
all experts, keeps the top k and renormalises them to sum 1, so with identical experts the block's output is
Σ_k w_k·MLP(x) = MLP(x) whatever the router says: the upcycled model's outputs equal the dense model's. The router
starts random (small, seeded) so that different tokens go to different experts and each expert's adapter learns
from its own share of the tokens once they are trained apart (Komatsuzaki et al., 2023, "Sparse Upcycling").
"""

from __future__ import annotations

import torch
from torch import nn

from loratune.errors import ConfigError

_LLAMA_FAMILY = ("llama", "mistral")


def upcycle_to_mixtral(dense: nn.Module, experts: int = 8, top_k: int = 2, *, router_std: float = 0.02, seed: int = 0):
    """A ``MixtralForCausalLM`` with ``experts`` copies of each MLP of ``dense`` (a Llama or Mistral causal LM),
    ``top_k`` of them per token, in ``dense``'s dtype, in eval mode. Raises ``ConfigError`` for another
    architecture or a ``top_k`` outside 1..experts."""
    from transformers import MixtralConfig, MixtralForCausalLM

    source = dense.config
    if source.model_type not in _LLAMA_FAMILY:
        raise ConfigError(f"upcycling builds Mixtral from a Llama or Mistral model; this one is {source.model_type!r}")
    if not 1 <= top_k <= experts:
        raise ConfigError(f"top_k must be between 1 and the number of experts ({experts}), got {top_k}")
    if getattr(source, "mlp_bias", False) or getattr(source, "attention_bias", False):
        raise ConfigError("upcycling needs bias-free attention and MLPs (Mixtral has no biases)")
    config = MixtralConfig(
        vocab_size=source.vocab_size,
        hidden_size=source.hidden_size,
        intermediate_size=source.intermediate_size,
        num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=source.num_attention_heads,
        num_key_value_heads=source.num_key_value_heads,
        head_dim=getattr(source, "head_dim", None) or source.hidden_size // source.num_attention_heads,
        hidden_act=source.hidden_act,
        max_position_embeddings=source.max_position_embeddings,
        rms_norm_eps=source.rms_norm_eps,
        rope_parameters=getattr(source, "rope_parameters", None),
        sliding_window=getattr(source, "sliding_window", None),
        tie_word_embeddings=source.tie_word_embeddings,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        router_jitter_noise=0.0,
        output_router_logits=False,
        bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id,
        pad_token_id=source.pad_token_id,
    )
    dtype = next(dense.parameters()).dtype
    with torch.device("meta"):
        moe = MixtralForCausalLM(config)
    moe = moe.to_empty(device="cpu").to(dtype)
    dense_state = dense.state_dict()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in moe.named_parameters():
            param.copy_(_upcycled(name, param, dense_state, generator, router_std))
        for name, buffer in moe.named_buffers():  # rotary inverse frequencies: recomputed from the same config
            if name in dict(dense.named_buffers()):
                buffer.copy_(dict(dense.named_buffers())[name])
    if config.tie_word_embeddings:
        moe.tie_weights()
    return moe.eval()


def _upcycled(name: str, param: torch.Tensor, dense: dict[str, torch.Tensor], generator, router_std: float):
    prefix, _, leaf = name.rpartition(".")
    if prefix.endswith("mlp.experts"):
        mlp = prefix.removesuffix("experts")
        if leaf == "gate_up_proj":
            stacked = torch.cat([dense[f"{mlp}gate_proj.weight"], dense[f"{mlp}up_proj.weight"]])
        else:
            stacked = dense[f"{mlp}down_proj.weight"]
        return stacked.unsqueeze(0).expand_as(param)
    if prefix.endswith("mlp.gate"):  # the router: random, so tokens spread over the experts
        return torch.randn(param.shape, generator=generator) * router_std
    if name not in dense:
        raise ConfigError(f"upcycling found no dense weight for {name}")
    return dense[name]
