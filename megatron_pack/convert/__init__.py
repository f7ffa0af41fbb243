"""megatron_pack.convert"""
