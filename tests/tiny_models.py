"""Tiny randomly initialised models for fast tests (real transformers architectures, no downloads)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 96


def tiny_llama(seed: int = 0, *, tie: bool = True, layers: int = 2, dtype=torch.float32) -> LlamaForCausalLM:
    """A 2-block Llama (hidden 32, GQA 4/2 heads) with tied embeddings by default, in eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_llama_family(config_class, model_class, **extra) -> nn.Module:
    """A tiny model of a Llama-like family (``config_class``/``model_class``: Mistral, Qwen2, Qwen3, ...) with grouped
    queries (4 heads, 2 for keys and values, 8 wide), in eval mode; ``extra`` goes to the config."""
    torch.manual_seed(5)
    config = config_class(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        **extra,
    )
    return model_class(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A 2-block GPT-2 (Conv1D projections c_attn/c_proj/c_fc), in eval mode."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


class TwoLayerNet(nn.Module):
    """A plain PyTorch model (not Hugging Face): embedding, two linears, output head."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(20, 16)
        self.fc1 = nn.Linear(16, 24)
        self.fc2 = nn.Linear(24, 16)
        self.head = nn.Linear(16, 20)

    def forward(self, ids):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(self.embed(ids))))))


def token_batch(seed: int = 0, batch: int = 2, length: int = 9) -> torch.Tensor:
    """Random token ids that fit the tiny vocabularies."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=generator)


def tiny_unet(seed: int = 0):
    """A tiny random Stable-Diffusion-style UNet (diffusers): attention, resnet and up/down-sampling convs."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    ).eval()


def tiny_clip_text(seed: int = 0):
    """A tiny random CLIP text encoder (transformers), the kind Stable Diffusion pipelines use."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=100,
        max_position_embeddings=16,
        projection_dim=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def unet_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy latents, timesteps, text embeddings) for ``tiny_unet``."""
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 4, 8, 8, generator=generator),
        torch.tensor([10, 500]),
        torch.randn(2, 5, 16, generator=generator),
    )


ENCODER_WORDS = [
    "book",
    "a",
    "flight",
    "to",
    "paris",
    "london",
    "tokyo",
    "please",
    "play",
    "some",
    "music",
    "song",
    "jazz",
    "rock",
    "what",
    "is",
    "the",
    "weather",
    "like",
    "today",
    "tomorrow",
    "in",
    "set",
    "an",
    "alarm",
    "for",
    "seven",
    "eight",
    "am",
    "pm",
    "cancel",
    "my",
    "order",
    "refund",
    "where",
    "package",
    "is",
    "it",
    "going",
    "to",
    "rain",
    "turn",
    "up",
    "volume",
    "wake",
    "me",
    "at",
    "i",
    "want",
    "hear",
    "need",
    "ticket",
    "train",
]


def tiny_encoder_dir(path, kind: str = "bert", seed: int = 0):
    """Save a tiny random encoder checkpoint (``bert``, ``roberta``, ``distilbert``, ``deberta-v2`` or
    ``modernbert``: the bare ``…Model`` without a head, as sentence encoders ship) with a word-level tokenizer
    over ``ENCODER_WORDS`` (BERT's specials; RoBERTa's for ``roberta``) into ``path``; return ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast, RobertaConfig, RobertaModel

    bert_like = kind != "roberta"
    specials = (
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if bert_like else ["<pad>", "<unk>", "<s>", "</s>", "<mask>"]
    )
    vocab = {token: i for i, token in enumerate([*specials, *dict.fromkeys(ENCODER_WORDS)])}
    pad, unk, cls, sep, mask = specials
    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    pair_template = f"{cls} $A {sep} $B:1 {sep}:1" if bert_like else f"{cls} $A {sep} {sep} $B {sep}"
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=pair_template, special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=pad,
        unk_token=unk,
        cls_token=cls,
        sep_token=sep,
        mask_token=mask,
        model_max_length=64,
    )
    torch.manual_seed(seed)
    size = dict(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=72 if kind == "roberta" else 64,
        initializer_range=0.3,
    )  # large enough that different inputs give different outputs
    if kind == "bert":
        model = BertModel(BertConfig(**size))
    elif kind == "roberta":
        model = RobertaModel(
            RobertaConfig(
                **size, pad_token_id=vocab[pad], bos_token_id=vocab[cls], eos_token_id=vocab[sep], type_vocab_size=1
            )
        )
    elif kind == "distilbert":
        from transformers import DistilBertConfig, DistilBertModel

        model = DistilBertModel(
            DistilBertConfig(
                vocab_size=len(vocab),
                dim=16,
                n_layers=2,
                n_heads=2,
                hidden_dim=32,
                max_position_embeddings=64,
                initializer_range=0.3,
            )
        )
    elif kind == "deberta-v2":
        from transformers import DebertaV2Config, DebertaV2Model

        model = DebertaV2Model(DebertaV2Config(**size))
    else:
        from transformers import ModernBertConfig, ModernBertModel

        ids = dict(
            pad_token_id=vocab[pad],
            bos_token_id=vocab[cls],
            eos_token_id=vocab[sep],
            cls_token_id=vocab[cls],
            sep_token_id=vocab[sep],
        )
        model = ModernBertModel(ModernBertConfig(**size, **ids))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


MOE_KINDS = ("qwen3_moe", "mixtral", "gpt_oss", "olmoe", "deepseek_v3")


def tiny_moe(
    kind: str = "qwen3_moe",
    seed: int = 0,
    *,
    dtype=torch.float32,
    layers: int = 2,
    experts: int = 4,
    vocab: int = VOCAB,
):
    """A tiny mixture-of-experts causal LM of family ``kind`` (``MOE_KINDS``: hidden 32, ``experts`` experts,
    top-2, fused 3-D expert weights as transformers 5 stores them), every weight random, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    specific = {
        "qwen3_moe": dict(
            num_experts=experts,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            intermediate_size=48,
            head_dim=8,
            norm_topk_prob=True,
        ),
        "mixtral": dict(num_local_experts=experts, num_experts_per_tok=2, intermediate_size=16),
        "gpt_oss": dict(
            max_position_embeddings=131072,
            num_local_experts=experts,
            num_experts_per_tok=2,
            intermediate_size=16,
            head_dim=8,
            layer_types=["full_attention"] * layers,
            sliding_window=16,
        ),
        "olmoe": dict(num_experts=experts, num_experts_per_tok=2, intermediate_size=16),
        "deepseek_v3": dict(
            num_key_value_heads=4,
            n_routed_experts=experts,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            intermediate_size=48,
            n_shared_experts=1,
            first_k_dense_replace=0,
            n_group=1,
            topk_group=1,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        ),
    }[kind]
    config = AutoConfig.for_model(kind, **{**common, **specific})
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # routers and biases start at zero in some families: every expert choice a tie
        for name, param in model.named_parameters():
            if "experts" in name or "gate" in name or "router" in name or "bias" in name:
                param.normal_(0, 0.2 if param.dim() > 1 else 0.05)
    return model.to(dtype).eval()
