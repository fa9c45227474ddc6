"""Multi-modal input types, and the parsing of OpenAI chat content parts and image URLs.

A prompt carries items as vLLM takes them: `{"prompt": ..., "multi_modal_data": {"image":
PIL.Image | [PIL.Image, ...], "video": frames | [frames, ...]}, "mm_processor_kwargs": {...}}`.
After processing, each item becomes a `MultiModalFeature`: its processed tensors, where its
placeholder tokens sit in the prompt, and an identifier: the content hash, or the user's
uuid from "multi_modal_uuids" (for the input cache and for prefix caching, which must not
share KV between different images at the same positions).
"""

from __future__ import annotations

import base64
import io
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MODALITIES = ("image", "video")


@dataclass(frozen=True, slots=True)
class PlaceholderRange:
    offset: int
    """Index in the prompt's token ids of the item's first placeholder token."""
    length: int
    """Number of placeholder tokens (the replacement's length)."""
    is_embed: tuple[bool, ...] | None = None
    """Which of the `length` tokens take an encoder output row (None: all of them). Lets a
    replacement hold text tokens around the embedding rows (e.g. begin/end-of-image)."""

    @property
    def num_embeds(self) -> int:
        return self.length if self.is_embed is None else sum(self.is_embed)


@dataclass(slots=True)
class MultiModalFeature:
    """One processed item of a prompt, as the model runner receives it."""

    modality: str
    identifier: str
    """Hex digest of the item's content and the processor kwargs used, or the item's uuid
    from multi_modal_uuids (see cache.item_key). The input cache's key; prefix caching mixes
    it into the hash of every KV block the placeholder overlaps."""
    data: dict[str, Any]
    """The processor's tensors for this item only (e.g. pixel_values, image_grid_thw): what
    the model's `embed_multimodal` takes."""
    placeholder: PlaceholderRange
    extra: dict[str, Any] = field(default_factory=dict)
    """Model-specific plain values (e.g. the Qwen grid for M-RoPE)."""
    unchunked: bool = False
    """The item's placeholder tokens must be computed in one step (its tokens attend to each
    other bidirectionally, as Gemma 3's image tokens do): the scheduler never splits it."""


def items_of(multi_modal_data: Mapping[str, Any]) -> dict[str, list[Any]]:
    """{"image": img} or {"image": [img, ...]} → {"image": [img, ...]}; a video is a list of
    frames (or an array), so a list of videos is a list of those."""
    if not isinstance(multi_modal_data, Mapping):
        raise TypeError(
            f"multi_modal_data must be a dict like {{'image': PIL.Image}}, got {type(multi_modal_data).__name__}."
        )
    result: dict[str, list[Any]] = {}
    for modality, value in multi_modal_data.items():
        if modality not in MODALITIES:
            raise ValueError(
                f"multi_modal_data has modality {modality!r}; supported modalities: {', '.join(MODALITIES)}."
            )
        if value is None:
            continue
        if modality == "video":
            # A None entry is an item sent before under its uuid (see uuids_of).
            first = next((v for v in value if v is not None), None) if isinstance(value, (list, tuple)) else None
            is_many = isinstance(value, (list, tuple)) and value and (first is None or _is_video(first))
            result[modality] = list(value) if is_many else [value]
        else:
            result[modality] = list(value) if isinstance(value, (list, tuple)) else [value]
    return result


def uuids_of(
    multi_modal_uuids: Mapping[str, Any] | None, multi_modal_data: Mapping[str, Any]
) -> tuple[dict[str, list[Any]], dict[str, list[str | None]]]:
    """The prompt's items and their uuids (vLLM's multi_modal_uuids: {"image": ["id-a", None,
    ...]} or {"image": "id-a"} for one item; None falls back to the content hash). An item may
    be None when its uuid names an item sent before; {"image": None} is then one None item
    per uuid. Raises ValueError when a modality's uuids and items differ in number."""
    if multi_modal_uuids is None:
        return items_of(multi_modal_data), {}
    if not isinstance(multi_modal_uuids, Mapping):
        raise TypeError(
            f"multi_modal_uuids must be a dict like {{'image': ['uuid-a']}}, got {type(multi_modal_uuids).__name__}."
        )
    uuids: dict[str, list[str | None]] = {}
    for modality, value in multi_modal_uuids.items():
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, (list, tuple)) or not all(v is None or isinstance(v, str) for v in values):
            raise TypeError(
                f"multi_modal_uuids[{modality!r}] must be a str or a list of str / None (one per item), got {value!r}."
            )
        uuids[modality] = list(values)
    data = dict(multi_modal_data)
    for modality, values in uuids.items():
        if modality in data and data[modality] is None:
            data[modality] = [None] * len(values)
    items = items_of(data)
    for modality, values in uuids.items():
        num_items = len(items.get(modality, ()))
        if len(values) != num_items:
            raise ValueError(
                f"multi_modal_uuids[{modality!r}] has {len(values)} uuid(s) but multi_modal_data has {num_items} "
                f"{modality} item(s); give one uuid (or None) per item."
            )
    return items, uuids


def _is_video(value: Any) -> bool:
    return isinstance(value, (list, tuple)) or getattr(value, "ndim", 0) == 4


def load_image(url: str) -> Any:
    """A PIL image from a data URL (`data:image/png;base64,...`), a `file://` URL or a local
    path. Remote http(s) URLs are not fetched (no network in the engine)."""
    from PIL import Image

    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise ValueError(f"Image data URL must be base64 encoded ('data:image/png;base64,...'), got {header!r}.")
        try:
            raw = base64.b64decode(payload, validate=False)
        except ValueError as error:
            raise ValueError(f"Image data URL has invalid base64 data: {error}.") from None
        source: Any = io.BytesIO(raw)
    elif url.startswith("file://"):
        source = urllib.parse.unquote(urllib.parse.urlparse(url).path)
    elif url.startswith(("http://", "https://")):
        raise ValueError(
            f"Image URL {url[:60]!r} is remote; pagedllm does not fetch URLs: pass a data: URL, a "
            "file:// URL, or a PIL image ({'type': 'image_pil', 'image_pil': img})."
        )
    else:
        source = url
    if isinstance(source, str) and not os.path.isfile(source):
        raise ValueError(f"Image file {source!r} does not exist.")
    try:
        image = Image.open(source)
        image.load()
    except Exception as error:  # PIL raises several types for undecodable data
        raise ValueError(f"Could not decode the image at {url[:60]!r}: {error}.") from None
    return image


# vLLM's other names of content parts (OpenAI's Responses API), as the part types here.
_PART_TYPE_ALIASES = {"input_text": "text", "input_image": "image_url"}
_PART_KEYS = ("text", "image_url", "image_pil", "video")


def content_part_type(part: Mapping[str, Any]) -> str | None:
    """A content part's type: its "type" (vLLM's aliases mapped), or, as vLLM infers it for a
    part without one, the one known key it has ({"image_url": {...}})."""
    kind = part.get("type")
    if kind is None:
        present = [key for key in _PART_KEYS if key in part]
        kind = present[0] if len(present) == 1 else None
    return _PART_TYPE_ALIASES.get(kind, kind)


def parse_chat_content(
    content: str | Sequence[Mapping[str, Any]], placeholders: Mapping[str, str]
) -> tuple[str, dict[str, list[Any]]]:
    """A message's content (a string, or OpenAI content parts) → (text, items by modality).
    As vLLM does for string-format chat templates, the text is the items' placeholder strings
    in order, then the text parts, joined by newlines."""
    if isinstance(content, str):
        return content, {}
    texts: list[str] = []
    marks: list[str] = []
    items: dict[str, list[Any]] = {}
    for part in content:
        kind = content_part_type(part)
        if kind == "text":
            texts.append(part["text"])
            continue
        if kind == "image_url":
            url = part["image_url"]
            item = load_image(url["url"] if isinstance(url, Mapping) else url)
            modality = "image"
        elif kind == "image_pil":
            item, modality = part["image_pil"], "image"
        elif kind == "video":
            item, modality = part["video"], "video"
        else:
            raise ValueError(
                f"Chat content part type {kind!r} is not supported; use 'text', 'image_url', "
                "'image_pil' or 'video'."
            )
        if modality not in placeholders:
            raise ValueError(f"This model does not take {modality} inputs; supported: {', '.join(placeholders) or 'none'}.")
        marks.append(placeholders[modality])
        items.setdefault(modality, []).append(item)
    return "\n".join([*marks, "\n".join(texts)]), items
