"""`python -m tunekit` is `tunekit`."""

from tunekit.cli import main

main()
