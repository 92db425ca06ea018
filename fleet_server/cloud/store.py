"""What the cloud endpoint reads from the fleet's database: credentials, quotas, capacity."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server.cloud.admission import Quota
from fleet_server.db.models import CloudSettings, HybridPlanRow

SETTINGS_ROW = 1


async def current_quotas(session: AsyncSession, now: datetime) -> dict[str, Quota]:
    """The quota of every device whose plan has not expired at ``now``."""
    rows = await session.execute(
        select(HybridPlanRow.device_id, HybridPlanRow.quota_rate, HybridPlanRow.quota_burst).where(
            HybridPlanRow.expires_at > now
        )
    )
    return {
        device_id: Quota(rate=max(0.0, float(rate)), burst=max(0.0, float(burst)))
        for device_id, rate, burst in rows
    }


async def configured_capacity(session: AsyncSession) -> float | None:
    """``cloud_settings.capacity`` when an operator set it (and it is positive), else ``None``."""
    settings = await session.get(CloudSettings, SETTINGS_ROW)
    if settings is None or not settings.capacity > 0:
        return None
    return float(settings.capacity)
