"""Random checkpoints of named sizes, written in the release layout, so any figure can be reproduced
without a download, and the reference's initialisation that training starts from. Weights follow the
reference's initialisation (normal(0, 0.02) matrices, unit norms and scales), which is what
`DiffusionGemmaForBlockDiffusion(config)` gives. Used by training, the `random-checkpoint` command, the
benchmarks and the tests."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import GenerationConfig, ModelConfig, TextConfig
from .weights import build_text_model, save

S, F = "sliding_attention", "full_attention"
SIZES: dict[str, dict] = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                 num_experts=8, top_k_experts=2, moe_intermediate_size=32, sliding_window=64,
                 layer_types=[S, S, S, F]),
    # the benchmark issue's mid size: hidden 1024, 8 layers, 32 experts top-4, the real vocabulary
    "mid": dict(vocab_size=262_144, hidden_size=1024, intermediate_size=2048, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=4, head_dim=128, global_head_dim=256,
                num_global_key_value_heads=2, num_experts=32, top_k_experts=4, moe_intermediate_size=512,
                sliding_window=1024, layer_types=[S, S, S, S, S, F, S, F]),
    "release": dict(vocab_size=262_144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                    num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
                    num_global_key_value_heads=2, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
                    sliding_window=1024, max_position_embeddings=262_144),
}
CANVAS = {"tiny": 32, "mid": 256, "release": 256}


def size_config(size: str, canvas_length: int | None = None) -> ModelConfig:
    if size not in SIZES:
        raise ValueError(f"unknown checkpoint size {size!r}; choose one of {', '.join(SIZES)}")
    text = TextConfig.from_dict({**SIZES[size], "eos_token_id": [1, 106], "use_bidirectional_attention": "vision"})
    return ModelConfig(text=text, canvas_length=canvas_length or CANVAS[size], eos_token_id=(1, 106))


def init_reference_(model, std: float = 0.02, seed: int = 0) -> None:
    """The reference's initialisation: matrices ~ N(0, std), norm weights and scales 1, scalars 1. The draws are
    made on the parameters' device (on a GPU a release-sized model initialises in seconds)."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_((torch.randn(p.shape, generator=g, device=device) * std).to(p.dtype))
            else:
                p.fill_(1.0)


def random_model(config: ModelConfig, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                 device: str | torch.device = "cpu"):
    """A text model of `config` with the reference's initialisation (built in fp32 on a CPU, so that the draws do
    not depend on `dtype`; directly in `dtype` on other devices)."""
    model = build_text_model(config, dtype=torch.float32 if str(device) == "cpu" else dtype, device=device)
    init_reference_(model, seed=seed)
    return model.to(dtype).eval().requires_grad_(False)


def write_random_checkpoint(path: str | Path, size: str = "tiny", dtype: torch.dtype = torch.bfloat16,
                            seed: int = 0, canvas_length: int | None = None) -> Path:
    config = size_config(size, canvas_length)
    model = random_model(config, dtype, seed)
    gen = GenerationConfig(eos_token_id=(1, 106, 50), pad_token_id=0)
    save(model, config, gen, path)
    return Path(path)
