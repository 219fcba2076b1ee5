"""Vision: preprocessing against transformers' Gemma 4 image processor (PIL backend), the tower and
projection against Gemma4VisionModel + the multimodal embedder, and whole-model parity with images
(encoder logits and cache) against DiffusionGemmaForBlockDiffusion with pixel_values."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

import diffusiongemma as dg
from diffusiongemma.vision.placement import block_ids, embed_prompt, expand_placeholders
from diffusiongemma.vision.preprocess import ImageError, preprocess
from hf_utils import make_hf_model, save_hf

rng = np.random.RandomState(0)


def _img(h, w, mode="RGB"):
    arr = (rng.rand(h, w, 4) * 255).astype(np.uint8)
    if mode == "L":
        return Image.fromarray(arr[..., 0], "L")
    if mode == "RGBA":
        return Image.fromarray(arr, "RGBA")
    if mode == "P":
        return Image.fromarray(arr[..., :3], "RGB").convert("P", palette=Image.ADAPTIVE, colors=16)
    if mode == "LA":
        return Image.fromarray(arr[..., :2], "LA")
    return Image.fromarray(arr[..., :3], "RGB")


CASES = [(1, 1, "RGB"), (7, 5, "RGB"), (48, 48, "RGB"), (224, 224, "RGB"), (768, 1024, "RGB"), (1080, 1920, "RGB"),
         (3000, 40, "RGB"), (40, 3000, "RGB"), (5, 2000, "L"), (900, 300, "RGBA"), (333, 777, "P"), (64, 96, "LA"),
         (2048, 2048, "RGB"), (17, 431, "RGBA")]


@pytest.mark.parametrize("h,w,mode", CASES)
@pytest.mark.parametrize("budget", [70, 280, 1120])
def test_preprocessing_matches_transformers(h, w, mode, budget):
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    image = _img(h, w, mode)
    ref = Gemma4ImageProcessorPil(max_soft_tokens=budget)(images=[image], return_tensors="pt")
    ours = preprocess(image, max_soft_tokens=budget)
    assert ours.num_soft_tokens == int(ref["num_soft_tokens_per_image"][0])
    assert torch.equal(ours.positions, ref["image_position_ids"][0])
    torch.testing.assert_close(ours.pixel_values, ref["pixel_values"][0].float(), atol=0, rtol=0)


def test_release_budget_examples():
    """Any square image -> 768x768 -> 256 soft tokens; 1024x768 -> 266; 1920x1080 -> 264."""
    assert preprocess(_img(500, 500)).num_soft_tokens == 256
    assert preprocess(_img(768, 1024)).num_soft_tokens == 266
    assert preprocess(_img(1080, 1920)).num_soft_tokens == 264


def test_bad_images_are_clear_errors(tmp_path):
    with pytest.raises(ImageError, match="not an image"):
        preprocess(b"definitely not an image")
    buf = io.BytesIO()
    _img(64, 64).save(buf, format="PNG")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        preprocess(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated"):  # a PNG signature, then a cut header
        preprocess(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageError, match="cannot read image"):
        preprocess(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="max_soft_tokens"):
        preprocess(_img(10, 10), max_soft_tokens=100)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = make_hf_model(0)
    path = save_hf(hf, tmp_path_factory.mktemp("vis") / "m")
    return hf, dg.load(path, vision=True)


def _hf_inputs(n_images):
    images = [preprocess(_img(37 + 11 * i, 53 - 7 * i), max_soft_tokens=70, patch_size=5, pooling=2)
              for i in range(n_images)]
    text = [10, 11, 4, 12, 13, 4, 14][: 3 + 3 * (n_images - 1)] if n_images else [10, 11, 12]
    ids = expand_placeholders(text, [im.num_soft_tokens for im in images], placeholder=4, boi=5, eoi=6)
    return images, torch.tensor(ids)


def test_tower_and_projection_match(pair):
    hf, ck = pair
    images, _ = _hf_inputs(2)
    pv = torch.stack([im.pixel_values for im in images])
    pp = torch.stack([im.positions for im in images])
    with torch.no_grad():
        want = hf.model.encoder.get_image_features(pv, pp).pooler_output
        got = torch.cat(ck.vision(pv, pp))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_images", [1, 2])
def test_encoder_with_images_matches_reference_generate_path(pair, n_images):
    """Encoder hidden states, logits and every layer's cache, with the bidirectional image blocks the
    reference's generate builds (mm_token_type_ids), then a decoder pass over that cache."""
    from transformers import DynamicCache

    hf, ck = pair
    images, ids = _hf_inputs(n_images)
    tt = (ids == 4).long()[None]
    pv = torch.stack([im.pixel_values for im in images])
    pp = torch.stack([im.positions for im in images])
    cache_t = DynamicCache(config=hf.config.text_config)
    pos = torch.arange(len(ids))[None]
    dummy = torch.empty(1, len(ids), 0)
    masks = hf.model.encoder.create_masks_for_generate(config=hf.config, inputs_embeds=dummy,
                                                       attention_mask=torch.ones(1, len(ids), dtype=torch.bool),
                                                       past_key_values=cache_t, position_ids=pos, mm_token_type_ids=tt)
    model, cache = ck.model, ck.model.new_cache()
    with torch.no_grad():
        out = hf.model.encoder(input_ids=ids[None], attention_mask=masks, past_key_values=cache_t, position_ids=pos,
                               pixel_values=pv, image_position_ids=pp, mm_token_type_ids=tt)
        embeds, blocks = embed_prompt(model, ck.vision, ids, images, (4,))
        assert blocks is not None and int(blocks.max()) == n_images - 1
        hidden = model.encode(None, [cache], inputs_embeds=embeds, block_ids=blocks)
        torch.testing.assert_close(hidden, out.last_hidden_state[0], atol=1e-5, rtol=0)
        logits_t = hf.lm_head(out.last_hidden_state).float().div(30).tanh().mul(30)[0]
        torch.testing.assert_close(model.logits(hidden), logits_t, atol=1e-5, rtol=0)
        for i, layer in enumerate(cache_t.layers):
            k, v = cache.layer(i)
            torch.testing.assert_close(k, layer.keys[0][:, -k.shape[1]:], atol=1e-5, rtol=0)
            torch.testing.assert_close(v, layer.values[0][:, -v.shape[1]:], atol=1e-5, rtol=0)
        canvas = torch.randint(0, 99, (1, 16))
        want = hf(decoder_input_ids=canvas, past_key_values=cache_t).logits[0]
        torch.testing.assert_close(model.logits(model.decode(canvas[0], [cache])), want, atol=1e-5, rtol=0)


def test_image_blocks_change_the_encoding(pair):
    """Without the bidirectional blocks the result differs: the test above would catch a missing mask."""
    _, ck = pair
    images, ids = _hf_inputs(1)
    with torch.no_grad():
        embeds, blocks = embed_prompt(ck.model, ck.vision, ids, images, (4,))
        a = ck.model.encode(None, [ck.model.new_cache()], inputs_embeds=embeds, block_ids=blocks)
        b = ck.model.encode(None, [ck.model.new_cache()], inputs_embeds=embeds)
    assert (a - b).abs().max() > 1e-3


def test_expansion_and_blocks():
    ids = expand_placeholders([1, 9, 2, 9, 3], [2, 3], placeholder=9, boi=7, eoi=8)
    assert ids == [1, 7, 9, 9, 8, 2, 7, 9, 9, 9, 8, 3]
    assert block_ids(torch.tensor(ids), (9,)).tolist() == [-1, -1, 0, 0, -1, -1, -1, 1, 1, 1, -1, -1]
    with pytest.raises(ValueError, match="2 image placeholders but 1 images"):
        expand_placeholders([9, 9], [3], 9, 7, 8)


def _gif(path, n=5):
    frames = [_img(40, 60) for _ in range(n)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=500, loop=0)


def test_video_from_animated_image_and_file(tmp_path):
    import av

    from diffusiongemma.vision.video import load_video, sample_indices

    assert sample_indices(100, 32)[:3] == [0, 3, 6] and sample_indices(5, 32) == [0, 1, 2, 3, 4]
    _gif(tmp_path / "a.gif", 5)
    v = load_video(tmp_path / "a.gif", num_frames=4, max_soft_tokens=70)
    assert len(v.frames) == 4 and v.timestamps == ["00:00", "00:00", "00:01", "00:01"]
    assert all(f.num_soft_tokens <= 70 for f in v.frames)
    # a real video file, encoded here with PyAV
    with av.open(str(tmp_path / "clip.mp4"), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(30):
            for packet in stream.encode(av.VideoFrame.from_image(_img(48, 64))):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    v = load_video(tmp_path / "clip.mp4", num_frames=8, max_soft_tokens=70)
    assert len(v.frames) == 8 and v.timestamps[-1] == "00:02"
    with pytest.raises(ImageError, match="cannot decode video"):
        (tmp_path / "bad.mp4").write_bytes(b"not a video")
        load_video(tmp_path / "bad.mp4")


def test_prompt_builder_expands_images_and_video(small_tokenizer_dir, tmp_path):
    from diffusiongemma.generation import PromptBuilder
    from diffusiongemma.text.chat import ChatError, ChatTemplate
    from diffusiongemma.text.media import MediaPolicy
    from diffusiongemma.text.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(small_tokenizer_dir)
    ids3 = tuple(tok.token_id(t) for t in ("<|image>", "<|image|>", "<image|>"))
    b = PromptBuilder(tok, ChatTemplate.from_dir(small_tokenizer_dir, tok.special_tokens_map()), ids3,
                      {"max_soft_tokens": 70, "patch_size": 8, "pooling_kernel_size": 2, "num_frames": 3,
                       "video_soft_tokens": 70})
    _gif(tmp_path / "v.gif", 3)
    buf = io.BytesIO()
    _img(30, 30).save(buf, format="PNG")
    import base64

    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "video", "video": str(tmp_path / "v.gif")},
                                         {"type": "text", "text": "what?"}]}]
    ids, images = b.chat_inputs(msgs)
    vid = tok.token_id("<|video|>")
    assert len(images) == 1 + 3
    assert sum(1 for t in ids if t == ids3[1]) == images[0].num_soft_tokens
    assert sum(1 for t in ids if t == vid) == sum(im.num_soft_tokens for im in images[1:])
    assert "00:00 <|image>" in tok.decode(ids)
    with pytest.raises(ChatError, match="network URLs are not fetched"):
        b.chat_inputs([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}])
    with pytest.raises(ChatError, match="local file paths are not allowed"):
        b.chat_inputs([{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "v.gif")}]}],
                      policy=MediaPolicy(allow_local_paths=False))
