"""megatron_pack.chat: text -> tokens. Chat JSONL records, templates, tokenizers, and
preprocessing into an indexed SFT dataset.

    schema          OpenAI / ShareGPT / Alpaca records -> messages (RecordError with the reason)
    tokenizer       HF tokenizer.json / directories / SentencePiece models, tiktoken fast path
    templates       built-in templates and the tokenizer's own Jinja template
    encode          one conversation -> tokens, loss mask, turn starts
    overlong        preprocess-time policies for over-long chats (truncate / drop / split-chat)
    preprocess      JSONL files -> PREFIX.bin/.idx + loss mask + turns + summary
    sample          the built-in sample chats and tokenizer (quickstart, tests)
    tiny_tokenizers small BPE / SentencePiece tokenizers trained in-process (tests, sample)
"""
