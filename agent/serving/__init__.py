"""Local inference: input validation, the fallback chain, its stages and breakers, the cloud."""

from agent.serving.breaker import BreakerState, CircuitBreaker
from agent.serving.chain import (
    Answer,
    Attempt,
    ChainConfig,
    ChainNotReady,
    FallbackChain,
    ModelSlot,
    ServingPlan,
    StageCounters,
    StageObserver,
    UnknownVersion,
)
from agent.serving.cloud import CloudClient, CloudError, CloudStage
from agent.serving.shadow import ShadowResult, ShadowRunner
from agent.serving.stages import ModelStage, SafeDefaultStage, Stage
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
    "ShadowResult",
    "ShadowRunner",
    "Stage",
    "StageCounters",
    "StageObserver",
    "UnknownVersion",
    "validate_inputs",
]
