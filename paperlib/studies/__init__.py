"""One module per study: ``compute(cfg)`` runs it and writes the results JSON; the remaining
functions draw tables and figures from that JSON alone. Notebooks call these and nothing else."""
