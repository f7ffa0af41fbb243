"""megatron_pack.data"""
