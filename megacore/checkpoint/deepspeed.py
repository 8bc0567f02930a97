"""The DeepSpeed backend's checkpoints: DeepSpeed's own files inside our commit protocol.

`save_checkpoint` / `load_checkpoint` write and read the engine's partitioned state; around them come the
same `step_XXXXXXXX` directory, meta.json (loader state, config), RNG streams, sha256 manifest and
commit as the torch backend (megacore/checkpoint/store.py). DeepSpeed's files are torch
pickles: they are read weights-only, with DeepSpeed's few data classes allowed and nothing else
(megacore/checkpoint/safe_load.py). They resume only on the world size that wrote them;
megacore/checkpoint/streaming.py reads fp32 weights from them for any other use.
"""

from __future__ import annotations

from pathlib import Path

from megacore.checkpoint.dcp import Checkpointer
from megacore.checkpoint.safe_load import weights_only_torch_load


class DeepSpeedCheckpointer(Checkpointer):
    """Our commit protocol around DeepSpeed's save_checkpoint / load_checkpoint."""

    def __init__(self, run_dir, cfg, rank: int, engine):
        super().__init__(run_dir, cfg, rank)
        self.engine = engine

    def _write_state(self, tmp: Path, parts, optimizers, writer=None) -> None:
        # DeepSpeed writes SAVE_DIR/TAG: the temporary directory of the commit protocol. (Its files are
        # hashed at commit by the rank whose partition they hold: megacore/checkpoint/digests.py.)
        self.engine.save_checkpoint(str(tmp.parent), tag=tmp.name, save_latest=False)

    def _read_state(self, path: Path, meta, parts, optimizers) -> None:
        # megacore.checkpoint.resume.check_compatible has refused another world size already.
        with weights_only_torch_load():
            self.engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=optimizers is not None,
                                        load_lr_scheduler_states=False, load_module_strict=True)
