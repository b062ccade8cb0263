"""One module per command: each wires the stages and does nothing else."""
