"""keymount for applications: read the keys keymount mounts into a Pod.

`keymount.reader.KeyDirectory` reads `/encryption-keys` by the rule in
docs/contract.md, "What an application does". This package uses the standard library
only; the webhook (package `webhook`) and its dependencies are never imported by it.
"""
