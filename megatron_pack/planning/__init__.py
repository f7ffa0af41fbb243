"""megatron_pack.planning"""
