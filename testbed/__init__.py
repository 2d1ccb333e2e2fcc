"""Test bed: real QEMU processes (7.2 from Debian, 10.x from a chroot), real guests, RAM checks.

Shared by the pytest suite, the demo and the benchmarks.
"""
