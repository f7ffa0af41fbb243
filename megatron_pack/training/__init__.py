"""megatron_pack.training"""
