"""The host side of stage0's effects: the one home for processes, atomic files and waiting.

Role: small helpers every module needs around the host (only waiting lives here so far; processes and atomic
files will move in). Trust boundary: none of its own; the callers decide what they wait for and what it means.
"""
