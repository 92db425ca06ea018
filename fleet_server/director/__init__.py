"""The director: per-device signed metadata saying which bundle each device runs (Uptane)."""

from fleet_server.director.repository import Assignment, DirectorRepository, Signed

__all__ = ["Assignment", "DirectorRepository", "Signed"]
