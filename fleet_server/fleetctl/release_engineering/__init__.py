"""The release engineer's commands: keys, bundles, the image repository and broker configuration.

They work on local files with the offline release keys; only ``release list --server``
reads a fleet server.
"""
