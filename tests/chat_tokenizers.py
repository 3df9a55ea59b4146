"""Local test tokenizers in other chat-template styles: SmolLM2's BPE with Llama-3 or Mistral special tokens and
jinja templates (no download), shared by the chat-template and special-token-injection tests."""

from __future__ import annotations

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
          "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
           "'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles "
           "are supported!') }}{% endif %}{% endfor %}")


def local_tokenizer(base_dir: str, out: str, specials: list[str], bos: str, eos: str, template: str) -> str:
    """A local tokenizer folder: SmolLM2's BPE plus another template style's special tokens and jinja template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.bos_token, tok.eos_token, tok.pad_token = bos, eos, eos
    tok.chat_template = template
    tok.save_pretrained(out)
    return out


def llama3_tokenizer(base_dir: str, out: str) -> str:
    """Llama-3 style: ``<|begin_of_text|>`` BOS, role headers, ``<|eot_id|>`` end of turn."""
    return local_tokenizer(base_dir, out, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                           "<|begin_of_text|>", "<|eot_id|>", LLAMA3)


def mistral_tokenizer(base_dir: str, out: str) -> str:
    """Mistral style: ``<s>`` BOS, ``[INST]`` text markers, ``</s>`` after each reply (user/assistant only)."""
    return local_tokenizer(base_dir, out, ["<s>", "</s>"], "<s>", "</s>", MISTRAL)
