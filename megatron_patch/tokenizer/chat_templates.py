"""Jinja chat templates written into HF tokenizer directories (``tokenizer_config.json``).

They are what ``tokenizer.apply_chat_template`` renders. Our own SFT tokenisation
(``megatron_patch.data.templates``) renders the same text in Python so it can also tell
prompt from answer; tests check the two agree token for token.

Every template strips message content, takes an optional leading system message and
requires user/assistant turns to alternate.
"""
from __future__ import annotations

# Llama-3 / Llama-3.1 instruct format: header tokens around the role, <|eot_id|> after each
# message, <|begin_of_text|> once at the start.
LLAMA3 = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Llama-2 chat format: <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s>
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('conversation roles must alternate user/assistant') }}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% set content = message['content'] %}"
    "{% if loop.first and system is not none %}"
    "{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content %}{% endif %}"
    "{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Alpaca-style format used for LLaMA-1 (which has no chat format of its own).
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
LLAMA1 = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] | trim %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '" + ALPACA_PREAMBLE + "' %}{% set turns = messages %}{% endif %}"
    "{{ bos_token + system + '\\n\\n' }}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('conversation roles must alternate user/assistant') }}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ '### Instruction:\\n' + message['content'] | trim + '\\n\\n### Response:\\n' }}"
    "{% else %}{{ message['content'] | trim + eos_token }}{% endif %}"
    "{% endfor %}"
)

BY_GENERATION = {"llama": LLAMA1, "llama2": LLAMA2, "llama3": LLAMA3, "llama3_1": LLAMA3}
