"""Measured launch and attestation: TPM extends, the CEL event log, quotes and their verifier.

Role: ``events`` defines the event types and the append-only log, ``tpm`` extends the TPM in step with it,
``replay`` recomputes the PCR from a log (pure), ``attest`` makes quotes and verifies evidence offline. The engine
measures every launch through ``tpm.Measurer`` before any guest code runs. Trust boundary: every TPM interaction
and every judgement of evidence is made here.
"""
