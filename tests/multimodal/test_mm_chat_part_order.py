"""LLM.chat keeps the order of a message's content parts for a template that loops over them
(Qwen2-VL's), as vLLM's "openai" content format does; string templates keep the joined text."""

from __future__ import annotations

from pagedllm import SamplingParams
from tiny_vl_models import IMAGE_PLACEHOLDER, random_image, tiny_vl_checkpoints  # noqa: F401 (fixture)

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
# Qwen2-VL's chat template, without its system turn: a string content as is, a list part by part.
QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_parts_reach_the_template_in_order(llm):
    first, second = random_image(56, 56, seed=1), random_image(56, 84, seed=2)
    content = [
        {"type": "text", "text": "first"},
        {"type": "image_pil", "image_pil": first},
        {"type": "text", "text": "second"},
        {"type": "image_pil", "image_pil": second},
    ]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}]
    output = llm.chat(messages, GREEDY, use_tqdm=False, chat_template=QWEN2_VL_TEMPLATE)[0]
    text = f"system: be brief\nuser: first{IMAGE_PLACEHOLDER}second{IMAGE_PLACEHOLDER}\nassistant:"
    assert output.prompt == text
    direct = llm.generate({"prompt": text, "multi_modal_data": {"image": [first, second]}}, GREEDY, use_tqdm=False)[0]
    assert output.prompt_token_ids == direct.prompt_token_ids
    assert output.outputs[0].token_ids == direct.outputs[0].token_ids


def test_string_format_puts_the_placeholders_first(llm):
    image = random_image(56, 56, seed=3)
    content = [{"type": "text", "text": "first"}, {"type": "image_pil", "image_pil": image},
               {"type": "text", "text": "second"}]
    prompt = llm.preprocess_chat([{"role": "user", "content": content}], QWEN2_VL_TEMPLATE,
                                 chat_template_content_format="string")[0]
    assert prompt["prompt"] == f"user: {IMAGE_PLACEHOLDER}\nfirst\nsecond\nassistant:"
    assert prompt["multi_modal_data"] == {"image": [image]}
