"""The host side of stage0's effects: the one home for processes (``proc``), atomic files (``files``), waiting
(``wait``) and the syscall table (``syscalls``).

Role: small helpers every module needs around the host. Trust boundary: none of its own; the callers decide what
they run, write and wait for, and what it means.
"""
