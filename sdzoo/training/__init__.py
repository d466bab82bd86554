"""Training: the paper's recipes, the data, the loop (``train``), the resume state and the run's record."""
