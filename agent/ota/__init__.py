"""Over-the-air updates: verifying bundles with TUF and installing them safely."""

from agent.ota.errors import UpdateRefused
from agent.ota.image_repository import BundleTarget, ImageRepositoryClient
from agent.ota.transport import FetchConfig

__all__ = ["BundleTarget", "FetchConfig", "ImageRepositoryClient", "UpdateRefused"]
