"""The cloud endpoint's work: authenticate, admit, validate, batch, answer.

Routes (:mod:`fleet_server.cloud.routes`) call :meth:`CloudService.infer` and
map its typed refusals to HTTP statuses; this module knows no HTTP. The order
of the checks is the rule:

1. the device's credential (:class:`Unauthorized`);
2. the model exists, in the version asked for (:class:`UnknownModel`);
3. the device's quota, then the endpoint's capacity (:class:`RateLimited`),
   before the body is parsed: a device beyond its quota costs nothing more;
4. the body is a valid request for this model (:class:`BadRequest`, naming
   the tensor or field at fault), before it is queued;
5. a place in the model's queue (:class:`RateLimited`, reason capacity; the
   tokens of step 3 are given back).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from fleet_server.cloud.admission import Quota, QuotaBook, Refusal, queue_full_refusal
from fleet_server.cloud.auth import DeviceAuthenticator
from fleet_server.cloud.batching import Batcher, QueueFull
from fleet_server.cloud.config import CloudConfig
from fleet_server.cloud.metrics import CloudMetrics
from fleet_server.cloud.models import CloudModel, RefreshReport
from fleet_server.errors import FleetError, Invalid, NotFound, Unauthenticated
from model_runtime import ModelRunError
from protocol.inference import (
    InferenceRequest,
    InferenceRequestError,
    InferenceResponse,
    check_input_datatypes,
    check_requested_outputs,
    decode_inputs,
    describe_validation_error,
    encode_response,
    select_outputs,
)
from protocol.validation import InvalidInput, check_declared_shapes

logger = logging.getLogger(__name__)


class CloudRefusal(FleetError):
    """A request the endpoint does not answer with a model's outputs; ``outcome`` labels it."""

    outcome = "refused"


class Unauthorized(CloudRefusal, Unauthenticated):
    """No credentials, or not the device's current ones."""

    outcome = "unauthorized"


class UnknownModel(CloudRefusal, NotFound):
    """No model of that name (or version) is served."""

    outcome = "unknown_model"


class BadRequest(CloudRefusal, Invalid):
    """The body is not a valid request for the model; the message names the fault."""

    outcome = "bad_request"


class BodyTooLarge(BadRequest):
    """The body is over the endpoint's limit."""


class ModelFailed(CloudRefusal):
    """The model failed while running the batch the request was in."""

    outcome = "model_error"


class Unavailable(CloudRefusal):
    """The endpoint cannot check credentials now (its database is unreachable)."""

    outcome = "unavailable"


class RateLimited(CloudRefusal):
    """Beyond the device's quota, the endpoint's capacity, or its queue."""

    outcome = "rate_limited"

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


class CloudService:
    """The models served, the quota book, the batchers and the authenticator, joined."""

    def __init__(
        self,
        config: CloudConfig,
        *,
        authenticator: DeviceAuthenticator,
        metrics: CloudMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.authenticator = authenticator
        self._clock = clock
        self.book = QuotaBook(
            default=_default_quota(config),
            capacity=config.capacity,
            now=clock(),
        )
        metrics.capacity.set(config.capacity)
        self.models: dict[str, CloudModel] = {}
        self.batchers: dict[str, Batcher] = {}

    # -- models ------------------------------------------------------------------------

    def serve(self, models: dict[str, CloudModel], report: RefreshReport) -> None:
        """Serve ``models`` from now on; count and log what ``report`` says happened."""
        for model in report.loaded:
            logger.info("cloud model %s %s verified and serving", model.name, model.version)
            self.metrics.model_loads.labels(model.name).inc()
            held = self.models.get(model.name)
            if held is not None:
                self.metrics.models_served.remove(held.name, held.version)
            self.metrics.models_served.labels(model.name, model.version).set(1)
        for model in report.withdrawn:
            logger.warning(
                "cloud model %s %s is no longer released for this endpoint; no longer served",
                model.name,
                model.version,
            )
            self.metrics.models_served.remove(model.name, model.version)
        for name, refusal in report.refused:
            logger.warning(
                "cloud release of %s refused (%s); what was served keeps serving: %s",
                "every model" if name == "*" else name,
                refusal.reason,
                refusal,
            )
            self.metrics.model_refusals.labels(refusal.reason).inc()
        self.models = models
        for name in models:
            if name not in self.batchers:
                batcher = Batcher(
                    name,
                    max_batch_size=self.config.max_batch_size,
                    max_wait_s=self.config.max_batch_wait_s,
                    max_queue=self.config.max_queue,
                    on_batch=self._observe_batch,
                )
                batcher.start()
                self.batchers[name] = batcher

    async def close(self) -> None:
        for batcher in self.batchers.values():
            await batcher.stop()

    @property
    def ready(self) -> bool:
        """Whether at least one verified model is being served."""
        return bool(self.models)

    def model(self, name: str, version: str | None = None) -> CloudModel:
        """The model served as ``name`` (in ``version``, when one is asked for)."""
        model = self.models.get(name)
        if model is None:
            served = ", ".join(sorted(self.models)) or "none"
            raise UnknownModel(f"no cloud model {name!r} is served (served: {served})")
        if version is not None and version != model.version:
            raise UnknownModel(
                f"model {name!r} is served in version {model.version}, not {version}"
            )
        return model

    # -- quotas --------------------------------------------------------------------------

    def set_quotas(
        self, quotas: Mapping[str, Quota], capacity: float | None, now: float | None = None
    ) -> None:
        """Hold devices to ``quotas`` and the endpoint to ``capacity`` (else the configured)."""
        total = capacity if capacity is not None else self.config.capacity
        self.book.update(
            quotas, _default_quota(self.config), total, self._clock() if now is None else now
        )
        self.metrics.capacity.set(total)

    # -- requests ------------------------------------------------------------------------

    async def authenticate(self, credentials: tuple[str, str] | None) -> str:
        """The device id of valid credentials; :class:`Unauthorized` otherwise."""
        if credentials is None:
            raise Unauthorized(
                "the cloud endpoint needs HTTP Basic credentials: the device id and its credential"
            )
        device_id, password = credentials
        try:
            ok = await self.authenticator.authenticate(device_id, password)
        except (SQLAlchemyError, OSError) as exc:
            logger.warning("cannot check device credentials: %s", exc)
            raise Unavailable(
                "the cloud endpoint cannot check device credentials now (its database is "
                "unreachable); try again later"
            ) from None
        if not ok:
            raise Unauthorized(f"wrong credentials for device {device_id!r}")
        return device_id

    def admit(self, device_id: str) -> None:
        """Take the device's and the endpoint's tokens, or raise :class:`RateLimited`."""
        refusal = self.book.admit(device_id, self._clock())
        if refusal is not None:
            raise RateLimited(refusal)

    async def infer(self, device_id: str, model: CloudModel, body: bytes) -> InferenceResponse:
        """Answer an admitted request for ``model``; refusals are typed."""
        request, inputs = self._validated(model, body)
        batcher = self.batchers[model.name]
        try:
            future = batcher.submit(model, inputs)
        except QueueFull as exc:
            self.book.refund(device_id)
            raise RateLimited(queue_full_refusal(model.name, exc.depth)) from None
        self.metrics.queue_depth.labels(model.name).set(batcher.depth)
        try:
            outputs = await future
        except ModelRunError as exc:
            raise ModelFailed(f"model {model.name} {model.version} failed: {exc}") from None
        finally:
            self.metrics.queue_depth.labels(model.name).set(batcher.depth)
        return encode_response(
            select_outputs(outputs, request.outputs),
            model_name=model.name,
            model_version=model.version,
            stage="cloud",
            id=request.id,
        )

    def _validated(self, model: CloudModel, body: bytes) -> tuple[InferenceRequest, Any]:
        try:
            request = InferenceRequest.model_validate_json(body)
        except ValidationError as exc:
            raise BadRequest(describe_validation_error(exc)) from None
        manifest = model.manifest
        try:
            check_input_datatypes(manifest, request.inputs)
            check_declared_shapes(manifest, ((t.name, t.shape) for t in request.inputs))
            inputs = model.contract.validate(decode_inputs(request))
            check_requested_outputs([t.name for t in manifest.outputs], request.outputs)
        except (InferenceRequestError, InvalidInput) as exc:
            raise BadRequest(str(exc)) from None
        rows = int(next(iter(inputs.values())).shape[0])
        if rows > self.config.max_batch_size:
            raise BadRequest(
                f"the request holds {rows} rows, more than the endpoint's max_batch_size "
                f"{self.config.max_batch_size}; split it"
            )
        return request, inputs

    def _observe_batch(self, name: str, rows: int) -> None:
        self.metrics.batch_rows.labels(name).observe(rows)
        batcher = self.batchers.get(name)
        if batcher is not None:
            self.metrics.queue_depth.labels(name).set(batcher.depth)


def _default_quota(config: CloudConfig) -> Quota:
    return Quota(rate=config.default_quota_rate, burst=float(config.default_quota_burst))
