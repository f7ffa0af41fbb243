"""megatron_pack.chat: text -> tokens. Chat JSONL records, templates, tokenizers, and
preprocessing into an indexed SFT dataset.

    schema          OpenAI / ShareGPT / Alpaca records -> messages (RecordError with the reason)
    tokenizer       HF tokenizer.json / directories / SentencePiece models, tiktoken fast path
    templates       template registry and the llama3/chatml fast paths
    jinja_*         the Jinja path: transformers' sandbox with bounds, placeholder spans, exact ids
    chat_encoding   whole rendered chats -> ids with character offsets (tokenizers / tiktoken / SentencePiece)
    tiktoken_model  Meta's tiktoken tokenizer.model (Llama-3 original/)
    builtin_templates  published Llama-3.1 / Llama-2 / Mistral v0.3 / Qwen2.5 templates
    encode          one conversation -> tokens, loss mask, turn starts
    overlong        preprocess-time policies for over-long chats (truncate / drop / split-chat)
    preprocess      JSONL files -> PREFIX.bin/.idx + loss mask + turns + summary
    sample          the built-in sample chats and tokenizer (quickstart, tests)
    tiny_tokenizers small BPE / SentencePiece tokenizers trained in-process (tests, sample)
"""
