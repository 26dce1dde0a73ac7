"""kvmrkt: a pod-native container runtime in which every pod runs in its own virtual machine.

Role: package root; kept import-light so ``import kvmrkt`` never pulls in QEMU or libvirt bindings.
"""

__version__ = "0.1.0"
