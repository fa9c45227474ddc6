"""OpenAI chat content parts and image URLs."""

from __future__ import annotations

import base64
import io

import pytest

from pagedllm.multimodal.inputs import items_of, load_image, parse_chat_content
from tiny_vl_models import random_image

PLACEHOLDERS = {"image": "<IMG>", "video": "<VID>"}


def test_content_parts_become_placeholders_then_text():
    image = random_image(20, 10, 0)
    text, items = parse_chat_content(
        [{"type": "text", "text": "what"}, {"type": "image_pil", "image_pil": image}, {"type": "text", "text": "is it"}],
        PLACEHOLDERS,
    )
    assert text == "<IMG>\nwhat\nis it"
    assert items == {"image": [image]}


def test_vllms_other_part_forms_parse_like_the_openai_ones(tmp_path):
    """{"type": "input_text"} / {"type": "input_image", "image_url": url} (OpenAI's Responses
    API) and parts without a type ({"image_url": {...}}), which vLLM infers from the key."""
    image = random_image(12, 8, 2)
    image.save(tmp_path / "b.png")
    url = str(tmp_path / "b.png")
    expected = parse_chat_content([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}],
                                  PLACEHOLDERS)
    for parts in ([{"type": "input_image", "image_url": url}, {"type": "input_text", "text": "hi"}],
                  [{"image_url": {"url": url}}, {"text": "hi"}]):
        text, items = parse_chat_content(parts, PLACEHOLDERS)
        assert text == expected[0] == "<IMG>\nhi"
        assert [i.tobytes() for i in items["image"]] == [i.tobytes() for i in expected[1]["image"]]


def test_data_url_and_path_images_decode(tmp_path):
    image = random_image(12, 8, 1)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    assert load_image(url).tobytes() == image.tobytes()
    image.save(tmp_path / "a.png")
    assert load_image(str(tmp_path / "a.png")).tobytes() == image.tobytes()
    assert load_image(f"file://{tmp_path / 'a.png'}").size == (12, 8)


def test_bad_urls_and_parts_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="does not fetch"):
        load_image("https://example.com/cat.png")
    with pytest.raises(ValueError, match="does not exist"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="Could not decode"):
        load_image("data:image/png;base64," + base64.b64encode(b"not a png").decode())
    with pytest.raises(ValueError, match="'input_audio' is not supported"):
        parse_chat_content([{"type": "input_audio", "input_audio": {}}], PLACEHOLDERS)
    with pytest.raises(ValueError, match="does not take video"):
        parse_chat_content([{"type": "video", "video": []}], {"image": "<IMG>"})


def test_multi_modal_data_accepts_one_item_or_a_list():
    image = random_image(4, 4, 0)
    frames = [image, image]
    assert items_of({"image": image}) == {"image": [image]}
    assert items_of({"image": [image, image]}) == {"image": [image, image]}
    assert items_of({"video": frames}) == {"video": [frames]}
    assert items_of({"video": [frames, frames]}) == {"video": [frames, frames]}
    with pytest.raises(ValueError, match="modality 'audio'"):
        items_of({"audio": b""})
