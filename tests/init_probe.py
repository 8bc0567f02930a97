"""Run under torchrun by tests/test_init.py: build the tiny model on the meta device, parallelize it by
the layout its overrides give, materialise and initialise each rank's shards, and write them, untrained,
as a weights-only DCP checkpoint to OUT (each rank its own shards). With train.init_from, the weights
are loaded into the shards first, as the trainer does.

    python -m torch.distributed.run --standalone --nproc-per-node N tests/init_probe.py OUT [KEY=VALUE ...]
"""

import sys

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from megacore.checkpoint.weights import load_weights_into_shards
from megacore.config import load_config
from megacore.distributed import init_distributed, shutdown
from megacore.loss import LanguageModelLoss
from megacore.model import Llama
from megacore.parallel.layout import Layout
from megacore.parallel.materialize import local_parameters
from megacore.parallel.parallelize import parallelize
from tests.helpers import REPO


def main(out: str, overrides: list[str]) -> None:
    env = init_distributed("cpu")
    try:
        write_shards(out, load_config(REPO / "configs/tiny.yaml", overrides), env)  # (its model freed on return)
    finally:
        shutdown()


def write_shards(out: str, cfg, env) -> None:
    """This rank's materialised (and, with train.init_from, loaded) shards as a DCP checkpoint at `out`."""
    layout = Layout.resolve(cfg, env.world_size)
    with torch.device("meta"):
        model = Llama(cfg.model)
    pm = parallelize(model, cfg, layout, layout.build_mesh("cpu"), env.device,
                     LanguageModelLoss.for_run(layout.tp, compiled=False))
    on_meta = [name for part in pm.parts for name, local, _, _ in local_parameters(part) if local.is_meta]
    on_meta += [name for part in pm.parts for name, b in part.named_buffers() if b.is_meta]
    assert not on_meta, f"every local shard and buffer is materialised: {on_meta}"
    if cfg.train.init_from:
        load_weights_into_shards(pm.parts, cfg.train.init_from)
    state = {}
    for part in pm.parts:
        state.update(get_model_state_dict(part))
    dcp.save({"model": state}, checkpoint_id=out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
