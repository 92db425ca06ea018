"""Local inference: input validation, the fallback chain, its stages and breakers, the cloud."""

from agent.serving.breaker import BreakerState, CircuitBreaker
from agent.serving.chain import (
    Answer,
    Attempt,
    ChainConfig,
    ChainNotReady,
    FallbackChain,
    HybridCounter,
    ModelSlot,
    StageCounters,
    StageObserver,
    UnknownVersion,
)
from agent.serving.cloud import CloudClient, CloudError, CloudRateLimited, CloudStage
from agent.serving.hybrid import AuditResult, PlanState, Route, TokenBucket
from agent.serving.shadow import ShadowResult, ShadowRunner
from agent.serving.stages import ModelStage, SafeDefaultStage, Stage
from agent.serving.validation import InputContract, InvalidInput, validate_inputs

__all__ = [
    "Answer",
    "Attempt",
    "AuditResult",
    "BreakerState",
    "ChainConfig",
    "ChainNotReady",
    "CircuitBreaker",
    "CloudClient",
    "CloudError",
    "CloudRateLimited",
    "CloudStage",
    "FallbackChain",
    "HybridCounter",
    "InputContract",
    "InvalidInput",
    "ModelSlot",
    "ModelStage",
    "PlanState",
    "Route",
    "SafeDefaultStage",
    "ShadowResult",
    "ShadowRunner",
    "Stage",
    "StageCounters",
    "StageObserver",
    "TokenBucket",
    "UnknownVersion",
    "validate_inputs",
]
