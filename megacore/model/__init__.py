from megacore.model.llama import Llama, flops_per_token, num_params

__all__ = ["Llama", "flops_per_token", "num_params"]
