"""Pure translation of a ``VMSpec`` into a QEMU command line.

Role: the one place that knows QEMU's flags. A lean ``microvm`` machine: no firmware, no default devices,
direct kernel boot (PVH ``vmlinux``), virtio-mmio devices only. QEMU runs jailed (``stage1_kvm.jail``): it reads
its inputs at paths inside the jail, and every file it writes and every socket it serves is opened by kvmrkt and
passed in as a file descriptor (``-add-fd`` + ``/dev/fdset/N`` for files, ``fd=`` for listening sockets), so the
jail holds no writable directory at all. Shares use ``security_model=none``: QEMU, running as the pod's uid,
creates files as that uid and cannot give them away (failed chowns are ignored), host symlinks work (the mapped
models cannot read them), and the VMM guard refuses set-id bits and device nodes.
Trust boundary: paths come from the store and the pod directory, never from the guest; option values that QEMU
parses with commas are checked so a path cannot smuggle in extra options.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from kvmrkt.errors import ConfigError
from kvmrkt.net.netconf import USER_NET, USER_PREFIX
from stage1_kvm.vmspec import VMSpec


def _opt(value: str | Path) -> str:
    """A value inside a QEMU ``-opt key=value,...`` list: commas must be doubled."""
    text = str(value)
    if "\n" in text:
        raise ConfigError(f"path {text!r} cannot be passed to QEMU")
    return text.replace(",", ",,")


def build_argv(spec: VMSpec, *, fds: Mapping[str, int], qemu: str = "qemu-system-x86_64",
               nic_backends: bool = True) -> list[str]:
    """The full argv to start the VM described by ``spec``; ``fds`` maps the spec's console, QMP and port names
    to the descriptors QEMU inherits (the status file open for writing, sockets listening). Without
    ``nic_backends`` the NICs are plugged into nothing (a template VM: ``stage1_kvm.template``; a clone gets its
    own backends, which hold no migrated state).

    Raises:
        ConfigError: a descriptor is missing, or a path cannot be passed.
    """
    fdsets: list[str] = []

    def file_chardev(cid: str, name: str) -> str:
        fdsets.extend(["-add-fd", f"fd={_fd(fds, name)},set={len(fdsets) // 2 + 1}"])
        return f"file,id={cid},path=/dev/fdset/{len(fdsets) // 2}"

    cpu = "host" if spec.accel == "kvm" else "max"
    accel = "kvm" if spec.accel == "kvm" else "tcg,tb-size=64"
    argv = [
        qemu,
        "-name", f"{spec.name},debug-threads=on",
        "-M", "microvm,x-option-roms=off" + ("" if spec.acpi else ",acpi=off"),
        "-accel", accel,
        "-cpu", cpu,
        "-m", f"{spec.memory_mib}M",
        "-smp", str(spec.vcpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", _opt(spec.kernel),
        "-initrd", _opt(spec.initrd),
        "-append", spec.cmdline,
        "-chardev", f"socket,id=console,fd={_fd(fds, spec.console_socket)},server=on,wait=off",
        "-serial", "chardev:console",
        "-chardev", f"socket,id=qmp,fd={_fd(fds, spec.qmp_socket)},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
    ]  # fmt: skip
    if spec.sandbox:
        argv += ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    argv += ["-device", f"virtio-serial-device,max_ports={len(spec.ports) + 1}"]
    for i, port in enumerate(spec.ports):
        if port.kind == "file":
            argv += ["-chardev", file_chardev(f"port{i}", port.path)]
        else:
            argv += ["-chardev", f"socket,id=port{i},fd={_fd(fds, port.path)},server=on,wait=off"]
        argv += ["-device", f"virtserialport,chardev=port{i},name={port.name}"]
    for disk in spec.disks:
        argv += [
            "-drive", f"file={_opt(disk.path)},format=raw,if=none,readonly=on,id={disk.id}",
            "-device", f"virtio-blk-device,drive={disk.id},serial={disk.serial}",
        ]  # fmt: skip
    for share in spec.shares:
        ro = ",readonly=on" if share.read_only else ""
        remap = ",multidevs=remap" if share.live else ""  # filesystems bound under it: no qid collisions
        argv += [
            "-fsdev", f"local,id={share.id},path={_opt(share.path)},security_model=none{ro}{remap}",
            "-device", f"virtio-9p-device,fsdev={share.id},mount_tag={share.tag}",
        ]  # fmt: skip
    for i, nic in enumerate(spec.nics):
        if not nic_backends:
            argv += ["-device", f"virtio-net-device,mac={nic.mac}"]
            continue
        if nic.tap is not None:  # QEMU runs in the pod's network namespace, where the tap is
            netdev = f"tap,id=net{i},ifname={_opt(nic.tap)},script=no,downscript=no"
        else:
            netdev = f"user,id=net{i},net={USER_NET}/{USER_PREFIX}"  # the addresses the guest is given
            for proto, host_ip, host_port, guest_port in spec.user_forwards:
                netdev += f",hostfwd={proto}:{host_ip}:{host_port}-:{guest_port}"
        argv += ["-netdev", netdev, "-device", f"virtio-net-device,netdev=net{i},mac={nic.mac}"]
    return [argv[0], *fdsets, *argv[1:]]  # descriptors first: QEMU resolves /dev/fdset/N when it opens the file


def _fd(fds: Mapping[str, int], name: str) -> int:
    if name not in fds:
        raise ConfigError(f"no file descriptor was opened for {name!r}")
    return fds[name]
