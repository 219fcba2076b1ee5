"""The checkpoint's tensor names: where each of this project's parameters lives in the release layout.

Text weights are stored once under `model.decoder.*` and shared by encoder and decoder; the LM head is
the embedding; `layer_scalar` is stored per mode (the encoder's under `model.encoder.language_model.`).
The vision tower and its projection are `model.encoder.{vision_tower,embed_vision}.*`, named like this
project's `vision.tower.Vision` modules under `VISION_ROOT`.
"""

from __future__ import annotations

from ..config import VisionConfig

TEXT_PREFIX = "model.decoder."
ENCODER_PREFIX = "model.encoder.language_model."
VISION_ROOT = "model.encoder."  # + the `Vision` module's own state-dict keys
VISION_PREFIXES = tuple(VISION_ROOT + m + "." for m in ("vision_tower", "embed_vision"))
LM_HEAD = "lm_head.weight"  # an untied copy of the embedding some writers add


def text_key_map(state_keys) -> dict[str, str]:
    """checkpoint key -> model state-dict key, for every text tensor the model (its state-dict keys) expects."""
    out = {}
    for name in state_keys:
        if ".lora_" in name:  # unmerged LoRA adapters are saved apart (training.lora)
            continue
        if name.endswith(".encoder_layer_scalar"):
            out[ENCODER_PREFIX + name.replace(".encoder_layer_scalar", ".layer_scalar")] = name
        else:
            out[TEXT_PREFIX + name] = name
    return out


def shared_key(key: str, expected: dict) -> str | None:
    """The text key a stored duplicate (`lm_head.weight`, an encoder copy of a shared weight) must equal."""
    if key == LM_HEAD:
        return TEXT_PREFIX + "embed_tokens.weight"
    if key.startswith(ENCODER_PREFIX) and TEXT_PREFIX + key[len(ENCODER_PREFIX):] in expected:
        return TEXT_PREFIX + key[len(ENCODER_PREFIX):]
    return None


def vision_shapes(v: VisionConfig, text_hidden: int) -> dict[str, tuple[int, ...]]:
    """Expected vision-tower tensors of a Gemma 4 vision config (transformers' naming)."""
    p, e = VISION_PREFIXES
    d, f, hd = v.hidden_size, v.intermediate_size, v.head_dim
    q_out, kv_out = v.num_attention_heads * hd, v.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {
        p + "patch_embedder.input_proj.weight": (d, 3 * v.patch_size**2),
        p + "patch_embedder.position_embedding_table": (2, v.position_embedding_size, d),
        e + "embedding_projection.weight": (text_hidden, d),
    }
    if v.standardize:
        shapes[p + "std_bias"] = (d,)
        shapes[p + "std_scale"] = (d,)
    for j in range(v.num_hidden_layers):
        lp = f"{p}encoder.layers.{j}."
        shapes.update({
            lp + "self_attn.q_proj.linear.weight": (q_out, d),
            lp + "self_attn.k_proj.linear.weight": (kv_out, d),
            lp + "self_attn.v_proj.linear.weight": (kv_out, d),
            lp + "self_attn.o_proj.linear.weight": (d, q_out),
            lp + "self_attn.q_norm.weight": (hd,),
            lp + "self_attn.k_norm.weight": (hd,),
            lp + "mlp.gate_proj.linear.weight": (f, d),
            lp + "mlp.up_proj.linear.weight": (f, d),
            lp + "mlp.down_proj.linear.weight": (d, f),
            **{lp + n + ".weight": (d,) for n in ("input_layernorm", "post_attention_layernorm",
                                                  "pre_feedforward_layernorm", "post_feedforward_layernorm")},
        })
    return shapes
