"""keymount: a Kubernetes admission webhook that mounts AES-256 keys into backend Pods.

Data flow, one module each: admission (AdmissionReview in, response out) →
injection (the decision and the JSONPatch) → keys (validity, fingerprint, order);
store holds each namespace's keyring, filled by localdir or cluster; server and cli
are the edges.
"""

__version__ = "0.2.0"
