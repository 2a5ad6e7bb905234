"""Training: the machinery every task shares (session, loop, checkpoint, distributed, setup),
the recipes (`recipes/`, one file per task) and the speed and memory pieces (`speed/`)."""
