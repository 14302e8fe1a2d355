"""Helpers every other module may use: atomic files and directories, locks, digests."""
