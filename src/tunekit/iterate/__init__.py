"""The next iteration: turn a run's evaluation into better data (drafts for weak labels)."""
