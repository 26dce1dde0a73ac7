"""Measured launch and attestation (issue [4/7]): TPM extends, the CEL event log, quotes and their verifier.

Role: nothing yet beyond the package; the engine does not import it until measured launch lands, and pods run
unmeasured (``kvmrkt status`` does not claim otherwise). Trust boundary: will own every TPM interaction.
"""
