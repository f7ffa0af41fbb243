"""megatron_pack.preprocess: chat JSONL records -> validated conversations -> the indexed SFT
dataset (tokens, loss mask, turn starts), in worker processes.

    schema     OpenAI / ShareGPT / Alpaca records -> messages (RecordError with the reason)
    encode     chunks of records -> token, loss-mask and turn arrays (ChunkEncoder, encode_conversation)
    overlong   preprocess-time policies for over-long chats (truncate / drop / split-chat)
    pipeline   JSONL files -> PREFIX.bin/.idx + loss mask + turns + summary (PreprocessConfig, preprocess)
    sample     the built-in sample chats and tokenizer (quickstart, tests)

Depends on ``templates``, ``tokenization`` and ``files``.
"""
