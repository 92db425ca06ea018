"""Over-the-air updates: verifying bundles with TUF and installing them safely.

The verification machinery (python-tuf, urllib3, cryptography) is imported
only by the modules that use it — the short-lived fetcher process and
``edge-agent verify`` — never by this package itself, so the serving process
stays small.
"""
