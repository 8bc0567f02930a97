"""float8 training of the transformer blocks' linears through torchao (`megacore[float8]`).

Each block's nn.Linear becomes torchao's Float8Linear (dynamic tensorwise scaling): its matmuls run in
float8 on the tensor cores, its weights stay fp32 (or bf16) parameters under the same names, so
checkpoints are unchanged. With FSDP the all-gather itself moves float8 weights (half of bf16), and
after each optimizer step the scales of every weight are computed in one pass for the next gather.
The output head and the embedding stay in bf16 (their precision matters most for the loss).
Needs a GPU with compute capability >= 8.9: megacore/device.py refuses it elsewhere, before this runs.
"""

from __future__ import annotations

from torch import nn

from megacore.model.llama import Llama


def apply_float8(model: Llama, fsdp: bool) -> None:
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig(enable_fsdp_float8_all_gather=fsdp)

    def in_a_block(module: nn.Module, fqn: str) -> bool:
        # torchao's float8 matmul needs both dims divisible by 16.
        return fqn.startswith("layers.") and isinstance(module, nn.Linear) and \
            module.in_features % 16 == 0 and module.out_features % 16 == 0

    convert_to_float8_training(model, config=config, module_filter_fn=in_a_block)


def precompute_float8_scales(parts: list[nn.Module]) -> None:
    """After the optimizer step: every float8 weight's scale for FSDP's next all-gather, in one pass."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    for part in parts:
        precompute_float8_dynamic_scale_for_fsdp(part)
