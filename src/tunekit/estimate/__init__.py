"""`tunekit estimate`: a run's peak memory (formulas, before any weight loads) and its time
(a few real steps measured here)."""
