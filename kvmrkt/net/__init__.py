"""Pod networks: flags and CNI configurations (``netconf``, ``net.d``), address leases (``leases``), and the
per-pod namespaces, CNI plugin runs and port forwards (``network``).

Trust boundary: ``net.d`` comes from config management, flags from the operator; a namespace that kvmrkt did not
create for the pod is never rewired.
"""
