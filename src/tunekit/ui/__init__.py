"""The local web dashboard (`tunekit ui`) over the run registry."""
