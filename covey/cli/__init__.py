"""The `covey` command line."""
