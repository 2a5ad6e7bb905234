"""The main job (`make demo`, `tunekit quickstart`): the demo data and the quickstart."""
