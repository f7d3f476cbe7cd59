"""The agent's updater: check in, refresh TUF metadata, download, verify, install, self-test, switch,
probation, commit or roll back. See :mod:`.machine`."""
