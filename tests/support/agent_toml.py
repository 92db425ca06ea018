"""The smallest agent configuration the unit tests start from (``agent.toml``'s required part)."""

from __future__ import annotations

# A device with an image repository and nothing else: each test appends the tables it needs
# ([director], [api], [server], …) or ``name = "…"`` (a device without a director).
AGENT_HEAD = """
device_id = "pump-17"
hardware_id = "rpi4-arm64"
data_dir = "data"
[image_repository]
url = "repo"
root = "trust/image-root.json"
"""
