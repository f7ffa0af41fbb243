"""megatron_pack.parallel"""
