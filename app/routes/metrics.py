"""`GET /metrics`: the API's metrics and its view of the queues, for Prometheus.

Workers serve their own metrics (batch sizes, job phase durations, model load
time, device memory) on ``HEARTH_WORKER_METRICS_PORT``; Prometheus scrapes
each worker as its own target.
"""

from __future__ import annotations

from typing import Any, cast

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.responses import Response

from app.state import AppState, StateDep
from workers.protocol import CONSUMER_GROUP

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response, summary="Prometheus metrics")
async def metrics(state: StateDep) -> Response:
    """Request counts and latencies, queue depth, lag and pending jobs per model.

    With Redis unreachable the request metrics are still served, when they
    matter most: the queue gauges are left out and `hearth_redis_up` is 0.
    """
    queue_gauges = (
        state.metrics.queue_depth,
        state.metrics.queue_lag,
        state.metrics.queue_pending,
        state.metrics.live_workers,
    )
    try:
        await _read_queues(state)
        state.metrics.redis_up.set(1)
    except (RedisConnectionError, RedisTimeoutError, OSError):
        for gauge in queue_gauges:
            gauge.clear()
        state.metrics.redis_up.set(0)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _read_queues(state: AppState) -> None:
    keys = state.dispatcher.keys
    pipe = state.redis.pipeline(transaction=False)
    for model_id in state.served:
        pipe.xlen(keys.stream(model_id))
        pipe.xinfo_groups(keys.stream(model_id))
    replies = await pipe.execute(raise_on_error=False)
    for index, model_id in enumerate(state.served):
        depth, groups = replies[2 * index], replies[2 * index + 1]
        state.metrics.queue_depth.labels(model_id).set(depth if isinstance(depth, int) else 0)
        group = next(
            (
                g
                for g in cast(list[dict[str, Any]], groups if isinstance(groups, list) else [])
                if g.get("name") in (CONSUMER_GROUP, CONSUMER_GROUP.encode())
            ),
            {},
        )
        lag = group.get("lag")
        state.metrics.queue_lag.labels(model_id).set(lag if isinstance(lag, int) else 0)
        state.metrics.queue_pending.labels(model_id).set(int(group.get("pending") or 0))
        state.metrics.live_workers.labels(model_id).set(len(await state.fleet.holders(model_id)))
