"""Trust policy and SELinux labelling.

Role: ``model`` loads policy files strictly, ``scopes`` names the scopes an image falls under, ``trust`` decides
(pure), ``signatures`` does the cryptography, ``truststore`` implements ``kvmrkt trust``, ``selinux`` allocates
and applies the pods' sVirt labels. Trust boundary: every signature and key decision is made here; the
engine only asks and obeys.
"""
