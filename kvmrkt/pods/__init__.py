"""Pods: their on-disk state (``pod``: phases, locks), what a pod is (``manifest``, ``runargs``), what confines it
(``confinement``, ``jail``, ``labels``), and the lifecycle on top (``prepare``, ``launch``, ``control``, ``inspect``).

Trust boundary: pod manifests and flags come from the operator (validated on the way in); the pod directory is
root's own; what the guest reports about a pod is never believed beyond the facts it may state.
"""
