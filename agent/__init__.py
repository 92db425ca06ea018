"""The edgefleet agent: verified model updates and local inference on a device."""

__version__ = "0.1.0"
