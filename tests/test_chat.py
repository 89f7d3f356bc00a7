"""Chat templates render as transformers' apply_chat_template renders them."""

import json

import pytest

from jaxlm.chat import ChatTemplateError, check_messages, render

# A Llama-2-like template: system folded into the first user turn, role alternation enforced.
TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' }}"
    "{% if loop.first and system %}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{% endif %}"
    "{{ message['content'] | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there "},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": [{"type": "text", "text": "Why?"}]}]


def test_render_equals_transformers(hf_dir, tmp_path):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(hf_dir("GPT2LMHeadModel"))  # bos = eos = <|endoftext|>
    tok.chat_template = TEMPLATE
    special = {"bos_token": tok.bos_token, "eos_token": tok.eos_token}
    text_messages = check_messages(MESSAGES)
    want = tok.apply_chat_template(text_messages, tokenize=False, add_generation_prompt=True)
    assert render(TEMPLATE, MESSAGES, **special) == want
    assert want.startswith(f"{tok.bos_token}[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello. ")
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        render(TEMPLATE, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], **special)


def test_tokenizer_reads_its_template(hf_dir, tmp_path):
    import shutil

    from jaxlm.tokenizer import load_tokenizer

    src = tmp_path / "m"
    shutil.copytree(hf_dir("GPT2LMHeadModel"), src)
    assert load_tokenizer(src).chat_template is None
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "default", "template": "A"},
                                                                             {"name": "tool_use", "template": "B"}]}))
    assert load_tokenizer(src).chat_template == "A"
    (src / "chat_template.jinja").write_text("C")  # newer transformers save it beside the config
    assert load_tokenizer(src).chat_template == "C"


@pytest.mark.parametrize("messages, message", [
    ([], "messages must be a non-empty list"),
    ([{"content": "x"}], r"messages\[0\] must be an object with a string \"role\""),
    ([{"role": "user", "content": 3}], r"messages\[0\].content must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "only text parts"),
])
def test_bad_messages_are_named(messages, message):
    with pytest.raises(ValueError, match=message):
        check_messages(messages)
