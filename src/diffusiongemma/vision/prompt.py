"""Images and videos of a chat prompt, token side: the placeholders the chat template wrote, expanded into
the soft tokens of the preprocessed images and video frames (`placement` holds the rules; this module
joins them to the tokenizer and the checkpoint's preprocessing settings)."""

from __future__ import annotations

from ..text import tokenizer as T
from ..text.chat import ChatError
from .placement import expand_placeholders
from .preprocess import ImageInput, preprocess
from .video import load_video


def expand_media(ids: list[int], media: list[tuple[str, object]], tokenizer, image_ids: tuple[int, int, int],
                 processor: dict) -> tuple[list[int], list[ImageInput]]:
    """Prompt ids with each image/video placeholder the chat template wrote expanded into its soft tokens, and
    the preprocessed images (video frames included) in the order their soft tokens appear.

    media: ("image" | "video", source) in the order of the placeholders (`text.media.extract_media`);
    image_ids: (begin-image, image soft token, end-image); processor: the checkpoint's preprocessing settings."""
    p = processor
    boi, img_id, eoi = image_ids
    vid_id = tokenizer.token_id(T.VIDEO_TOKEN)
    images, out, k = [], [], 0
    for t in ids:
        if t not in (img_id, vid_id) or k >= len(media):
            out.append(t)
            continue
        kind, src = media[k]
        k += 1
        if kind == "image":
            im = preprocess(src, p["max_soft_tokens"], p["patch_size"], p["pooling_kernel_size"])
            images.append(im)
            out += expand_placeholders([img_id], [im.num_soft_tokens], img_id, boi, eoi)
        else:
            video = load_video(src, p["num_frames"], p["video_soft_tokens"], p["patch_size"], p["pooling_kernel_size"])
            for n, (frame, stamp) in enumerate(zip(video.frames, video.timestamps)):
                images.append(frame)
                out += tokenizer.encode((" " if n else "") + stamp + " ")
                out += [boi] + [vid_id] * frame.num_soft_tokens + [eoi]
    if k != len(media):
        raise ChatError(f"the chat template placed {k} of {len(media)} images")
    return out, images
