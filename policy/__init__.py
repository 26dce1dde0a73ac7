"""Trust policy (issue [3/7]) and, later, SELinux labelling (issue [5/7]).

Role: ``model`` loads policy files strictly, ``trust`` decides (pure), ``signatures`` does the cryptography,
``truststore`` implements ``kvmrkt trust``. Trust boundary: every signature and key decision is made here; the
engine only asks and obeys.
"""
