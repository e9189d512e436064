"""The volunteer's worker daemon: join, sync, train, average, commit, repeat."""
