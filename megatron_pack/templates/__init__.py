"""megatron_pack.templates: messages -> rendered parts and assistant spans, exactly as transformers'
``apply_chat_template`` renders them and ``return_assistant_tokens_mask`` marks them.

    messages           Message, RecordError: what a template renders and how it refuses
    base               Rendered (token parts, trained flags, message index), ChatTemplate, the end-of-turn rule
    fast_paths         llama3 / chatml rendered by token (equal to their published templates)
    registry           --chat-template names, auto, build_template
    builtin_templates  published Llama-3 / Llama-3.1 / Llama-2 / Mistral v0.3 / Qwen2.5 / ChatML templates
    jinja_env          transformers' sandboxed environment with bounds on one render
    jinja_render       placeholder renders -> message slots, trained spans, turn regions
    jinja_template     the Jinja path: render, tokenize the whole chat, mask from character spans

Depends on ``tokenization`` only.
"""
