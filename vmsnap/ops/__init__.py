"""Offline verbs built on the codec, the file format and the I/O engine."""
