"""The cloud endpoint: released cloud models over the Open Inference Protocol, per-device quotas.

``fleet-server cloud`` runs it (:mod:`fleet_server.cloud.cli`).
"""

from fleet_server.cloud.admission import Quota, QuotaBook, Refusal, TokenBucket
from fleet_server.cloud.config import CloudConfig
from fleet_server.cloud.endpoint import CloudEndpoint

__all__ = ["CloudConfig", "CloudEndpoint", "Quota", "QuotaBook", "Refusal", "TokenBucket"]
