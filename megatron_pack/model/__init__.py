"""megatron_pack.model"""
