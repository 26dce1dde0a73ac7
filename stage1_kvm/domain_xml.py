"""Pure translation of a ``VMSpec`` into libvirt domain XML (the ``libvirt`` backend's counterpart of
``qemu_argv``).

Role: the same VM as the ``qemu`` backend: a ``microvm`` with direct kernel boot, read-only virtio disks (found by
serial), virtio-9p shares (``squash``, QEMU's ``security_model=none``: files are the pod uid's),
virtio-serial channels for the agent (a file and unix sockets; libvirtd opens them itself and passes the
descriptors), the console on a unix socket (kvmrkt reads it), no balloon and no USB (Debian's libvirt 9.0
needs both off for microvm), and
``on_reboot=destroy`` so a guest that ends (kvmrkt's init reboots) ends the domain. Security labels: QEMU runs as
the pod's own uid and gid (a static ``dac`` label); libvirt relabels only what is the pod's alone (its copy of the
kernel, its initramfs, its private state directory), never the shared store images or the agent files
(``relabel='no'`` on those); the pod's sVirt label as a static ``selinux`` seclabel where SELinux is enabled.
Trust boundary: every value comes from the store, the pod directory or the configuration, never from the guest;
ElementTree escapes all text.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from kvmrkt.stage1 import JailSpec
from stage1_kvm.vmspec import VMSpec


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def _no_relabel(source: ET.Element) -> None:
    _sub(source, "seclabel", model="dac", relabel="no")


def build_domain_xml(
    spec: VMSpec, *, uuid: str, pod_dir: Path, qemu: str, jail: JailSpec, selinux_label: str | None = None,
    socket_dir: Path | None = None,
) -> str:
    """The transient domain for a pod (runtime files in ``pod_dir``, sockets in ``socket_dir``; ``spec``'s inputs
    are already at paths the pod's uid can reach), run as ``jail``'s uid and gid."""
    dom = ET.Element("domain", {"type": "kvm" if spec.accel == "kvm" else "qemu"})
    _sub(dom, "name", spec.name)
    _sub(dom, "uuid", uuid)
    _sub(dom, "memory", str(spec.memory_mib), unit="MiB")
    _sub(dom, "vcpu", str(spec.vcpus))
    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="microvm")
    _sub(os_el, "kernel", str(spec.kernel))
    _sub(os_el, "initrd", str(pod_dir / spec.initrd))  # absolute in a jailed spec
    _sub(os_el, "cmdline", spec.cmdline)
    if spec.acpi:
        _sub(_sub(dom, "features"), "acpi")
    if spec.accel == "kvm":
        _sub(dom, "cpu", mode="host-passthrough")
    else:
        _sub(dom, "cpu", mode="maximum")
    _sub(dom, "clock", offset="utc")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _sub(dom, event, "destroy")
    dev = _sub(dom, "devices")
    _sub(dev, "emulator", qemu)
    _sub(dev, "controller", type="usb", model="none")
    _sub(dev, "memballoon", model="none")
    mmio = {"type": "virtio-mmio"}  # microvm has no PCI bus: every virtio device sits on virtio-mmio
    _sub(_sub(dev, "controller", type="virtio-serial", index="0"), "address", **mmio)
    for i, disk in enumerate(spec.disks):
        d = _sub(dev, "disk", type="file", device="disk")
        _sub(d, "driver", name="qemu", type="raw")
        _no_relabel(_sub(d, "source", file=str(disk.path)))  # store images are shared by pods: never chowned
        _sub(d, "target", dev=f"vd{chr(ord('a') + i)}", bus="virtio")
        _sub(d, "readonly")
        _sub(d, "serial", disk.serial)
        _sub(d, "address", **mmio)
    for share in spec.shares:
        fs = _sub(dev, "filesystem", type="mount", accessmode="squash",
                  **({"multidevs": "remap"} if share.live else {}))
        _sub(fs, "source", dir=str(share.path))
        _sub(fs, "target", dir=share.tag)
        if share.read_only:
            _sub(fs, "readonly")
        _sub(fs, "address", **mmio)
    for nic in spec.nics:  # a tap libvirtd opens in its namespace (lent there: kvmrkt.net.taps), or user mode
        iface = _sub(dev, "interface", type="user" if nic.tap is None else "ethernet")
        _sub(iface, "mac", address=nic.mac)
        if nic.tap is not None:
            _sub(iface, "target", dev=nic.tap, managed="no")
        _sub(iface, "model", type="virtio")
        _sub(iface, "address", **mmio)
    serial = _sub(dev, "serial", type="unix")
    _no_relabel(_sub(serial, "source", mode="bind", path=str((socket_dir or pod_dir) / spec.console_socket)))
    _sub(serial, "target", port="0")
    for port in spec.ports:
        if port.kind == "file":
            ch = _sub(dev, "channel", type="file")
            _no_relabel(_sub(ch, "source", path=str(pod_dir / port.path)))
        else:
            ch = _sub(dev, "channel", type="unix")
            _no_relabel(_sub(ch, "source", mode="bind", path=str((socket_dir or pod_dir) / Path(port.path).name)))
        _sub(ch, "target", type="virtio", name=port.name)
    dac = _sub(dom, "seclabel", type="static", model="dac", relabel="yes")
    _sub(dac, "label", f"+{jail.uid}:+{jail.gid}")
    if selinux_label:
        sel = _sub(dom, "seclabel", type="static", model="selinux", relabel="yes")
        _sub(sel, "label", selinux_label)
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")
