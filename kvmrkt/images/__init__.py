"""Images: references and sources (``sources``, ``registry``), the content-addressed store (``store``), layers and
their limits (``layers``, ``decompress``, ``scratch``), the ACI and OCI formats (``aci``, ``oci``), and the image
commands on top (``service``).

Trust boundary: every byte of an image is hostile until the trust gate (``kvmrkt.trust``) accepted its
signatures, and stays hostile as data afterwards (bounded parsing, no path leaves its root).
"""
