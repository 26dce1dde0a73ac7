"""kvmrkt-oci, the OCI runtime (create/start/kill/delete/state/exec on bundles), built on the stage1 contract only.

Trust boundary: the bundle (config.json and rootfs) comes from the container engine and is validated as hostile
input; containers are pods like any other, judged and measured in the same schema.
"""
