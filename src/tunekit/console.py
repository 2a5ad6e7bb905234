"""The consoles tunekit prints to. soft_wrap: never break a long path or message across lines in
logs and CI output, where rich would otherwise wrap at 80 columns."""

from rich.console import Console

err = Console(stderr=True, soft_wrap=True)  # progress, logs, errors
out = Console(soft_wrap=True)  # results: tables, summaries
