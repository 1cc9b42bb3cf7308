"""vLLM's request fields that this server does not implement, refused by name instead of ignored.

Request bodies ignore unknown fields (OpenAI's SDKs add new ones faster than servers follow), so a
vLLM client's extension would otherwise be dropped without a word. A field sent at vLLM's default
asks for nothing, so it passes; any other value is a 400 naming it.
"""
from __future__ import annotations

from sloserve.server.errors import APIError

# field -> vLLM's default (the value that asks for nothing)
_UNSUPPORTED_DEFAULTS: dict[str, object] = {
    "use_beam_search": False,
    "length_penalty": 1.0,
    "allowed_token_ids": None,
    "bad_words": None,
    "truncate_prompt_tokens": None,
    "spaces_between_special_tokens": True,
    "guided_json": None,
    "guided_regex": None,
    "guided_choice": None,
    "guided_grammar": None,
    "guided_decoding_backend": None,
    "guided_whitespace_pattern": None,
    "structured_outputs": None,
    "logits_processors": None,
    "return_tokens_as_token_ids": None,
    "prompt_embeds": None,
    "add_special_tokens": None,  # refused at any value: its default differs by endpoint
    "add_generation_prompt": True,
    "continue_final_message": False,
    "chat_template": None,
    "chat_template_kwargs": None,
    "documents": None,
    "mm_processor_kwargs": None,
    "cache_salt": None,
    "kv_transfer_params": None,
    "vllm_xargs": None,
    "parallel_tool_calls": None,  # tools are refused anyway; any value here asks for tool calls
}


def refuse_unsupported_vllm_fields(body: dict) -> None:
    for name, default in _UNSUPPORTED_DEFAULTS.items():
        if name in body and body[name] is not None and (default is None or body[name] != default):
            raise APIError(400, f"{name} is not supported by this server (leave it out)", param=name)
