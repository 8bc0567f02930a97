"""Launching training: torchrun on this machine now; Slurm jobs later."""
