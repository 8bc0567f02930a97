"""Checkpoints: what a run leaves behind to resume, evaluate or export, in RUN_DIR/checkpoints/.

    step_00000200/          the backend's files (DCP shards, or DeepSpeed's), written by each rank;
                            meta.json (step, data-loader state, resolved config, world size);
                            rng/rank_00000.json ... (every RNG stream of every rank);
                            manifest.json (size and sha256 of every other file; written last)
    abandoned/              checkpoints a rollback set aside (kept, never read again)

store.py      step directories, manifest, verification, the commit, retention, setting newer ones aside
dcp.py        the torch backend's checkpointer (torch.distributed.checkpoint) and the RNG streams
deepspeed.py  the DeepSpeed backend's checkpointer, and consolidating its files into fp32 weights
resume.py     which checkpoint `--resume` means, and whether this run can load it
weights.py    weights only: into an unparallelized model, consolidation, a trained model for eval/generate
hf.py         Hugging Face LlamaForCausalLM directories, out and in
safe_load.py  reading DCP's and DeepSpeed's pickles through allow-lists: loading executes nothing
"""
