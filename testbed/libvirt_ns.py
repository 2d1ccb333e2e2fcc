"""Run virtlogd and libvirtd with private state (started by `unshare --mount` by
testbed.libvirt.Libvirtd): each named host directory is bound from ROOT/<same path> in this
mount namespace only, so the daemons and the QEMUs they start see their own /etc/libvirt,
/run/libvirt, ... and nothing leaks into the host's mounts.

/dev/kvm gets the mode Debian's udev rule gives it (root:kvm 0660), in this namespace only,
where a host without udev left it root-only: QEMU as libvirt-qemu (group kvm) needs it.

Usage: python -m testbed.libvirt_ns ROOT DIR...
"""

import grp
import os
import stat
import subprocess
import sys

KVM = "/dev/kvm"


def _kvm_for_group(root: str) -> None:
    st = os.stat(KVM)
    try:
        kvm_gid = grp.getgrnam("kvm").gr_gid
    except KeyError:
        return
    if st.st_gid == kvm_gid and st.st_mode & 0o060 == 0o060:
        return
    node = os.path.join(root, "kvm")
    if not os.path.exists(node):
        os.mknod(node, stat.S_IFCHR | 0o660, st.st_rdev)
    os.chown(node, 0, kvm_gid)
    os.chmod(node, 0o660)
    subprocess.run(["mount", "--bind", node, KVM], check=True)


def main(argv: list[str]) -> None:
    root, dirs = argv[0], argv[1:]
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    for directory in dirs:
        os.makedirs(directory, exist_ok=True)
        subprocess.run(["mount", "--bind", os.path.join(root, directory.lstrip("/")), directory],
                       check=True)
    _kvm_for_group(root)
    subprocess.run(["/usr/sbin/virtlogd", "-d", "-p", os.path.join(root, "virtlogd.pid")],
                   check=True)
    os.execv("/usr/sbin/libvirtd", ["libvirtd", "-p", os.path.join(root, "libvirtd.pid")])


if __name__ == "__main__":
    main(sys.argv[1:])
