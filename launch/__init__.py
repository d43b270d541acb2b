"""Everything about starting jobs: SLURM, torchrun, containers."""
