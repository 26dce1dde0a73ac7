"""kvmrkt's VM stage1: every pod runs in its own QEMU (or libvirt) virtual machine.

Role: turn a prepared pod into a running VM and report back what its apps did. Backends are imported lazily
through ``kvmrkt.stage1.BACKENDS``. Trust boundary: everything inside the VM (apps, and the guest side of the
agent channel once apps run) is untrusted; the host side never executes what the guest sends.
"""
