"""Values of command-line options that the CLI offers before it loads the orchestration
(which loads numpy and QEMU's QMP library: the `vmsnap` command loads them only for the verb
it runs, and a lazy restore starts QEMU first, see relaunch.start_qemu)."""

#: when a save's page checksums are added where QEMU wrote the pages itself (`--seal`)
SEAL_WHEN = ("now", "background", "later")
