"""The REST API's request and response bodies (``/api/v1``), version 1, a module per resource.

The server validates every request body against these models and answers
with them; its OpenAPI document is generated from them, so the document and
the server cannot disagree. Request bodies refuse unknown fields, so a typo
in a script is an error rather than a silently ignored option. What every body
shares is in :mod:`.base`.
"""
