"""megatron_pack.tokenization: text -> token ids (with character offsets), the way transformers
tokenizes, for HF ``tokenizer.json``, SentencePiece and Meta's tiktoken file.

    base            TokenizerError, BaseTokenizer: what templates may ask of a tokenizer
    tokenizer       HF tokenizer.json / directories / SentencePiece models (tiktoken fast path), load_tokenizer
    tiktoken_model  Meta's tiktoken tokenizer.model (Llama-3 original/)
    offsets         whole rendered chats -> ids with character offsets (added tokens as transformers matches them)
    tiny_tokenizers small BPE / word-level / SentencePiece tokenizers trained in-process (tests, sample)

Imports nothing from the rest of megatron_pack (``templates`` and ``preprocess`` sit above it).
"""
