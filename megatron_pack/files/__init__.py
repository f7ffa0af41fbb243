"""megatron_pack.files: on-disk formats every layer above shares.

    indexed      the SFT indexed dataset (tokens, loss mask, turn starts): writer and reader
    safetensors  safetensors written straight from tensor memory
    atomic       write-then-rename helpers, so no half-written file looks complete

The bottom of the package tree: imports nothing from megatron_pack.
"""
