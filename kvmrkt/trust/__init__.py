"""Trust decisions about images: the import gate and the policy verdicts (``gate``), the dependency closure a pod
is judged on (``admission``), and the one place that knows signature file names (``sigfiles``).

Trust boundary: the policy files come from config management and are validated by ``policy``; signatures and
image names come from the registry or the operator and are hostile. Nothing here runs before a verdict is needed,
and nothing accepts by default.
"""
