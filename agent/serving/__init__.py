"""Local inference: input validation, the fallback chain, circuit breakers, the cloud stage."""

from agent.serving.breaker import BreakerState, CircuitBreaker
from agent.serving.chain import (
    Answer,
    Attempt,
    ChainConfig,
    ChainNotReady,
    FallbackChain,
    ModelSlot,
    ModelStage,
    SafeDefaultStage,
    ServingPlan,
    Stage,
    StageCounters,
    StageObserver,
    UnknownVersion,
)
from agent.serving.cloud import CloudClient, CloudError, CloudStage
from agent.serving.validation import InputContract, InvalidInput, validate_inputs

__all__ = [
    "Answer",
    "Attempt",
    "BreakerState",
    "ChainConfig",
    "ChainNotReady",
    "CircuitBreaker",
    "CloudClient",
    "CloudError",
    "CloudStage",
    "FallbackChain",
    "InputContract",
    "InvalidInput",
    "ModelSlot",
    "ModelStage",
    "SafeDefaultStage",
    "ServingPlan",
    "Stage",
    "StageCounters",
    "StageObserver",
    "UnknownVersion",
    "validate_inputs",
]
