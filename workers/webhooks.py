"""Telling a job's webhook that the job ended.

The body is the job as `GET /v1/jobs/{id}` shows it. It is signed like
Stripe's webhooks: ``Hearth-Signature: t=<unix time>,v1=<hex>`` where the hex
is HMAC-SHA256 of ``"<t>." + body`` under ``HEARTH_WEBHOOK_SECRET``, so a
receiver can check both origin and freshness. Deliveries are retried with
exponential backoff; a failed delivery never changes the job's status, and is
noted in the job's record (``webhook_status``) while that record exists.

Whoever ends a job delivers its webhook, once: a worker for the jobs it ends,
the API for the jobs it cancels or finds past their deadline. The status
scripts say which call ended a job, so no ending is told twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time

import httpx
import orjson
from redis.asyncio import Redis
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from hearth.settings import Settings
from workers.protocol import WEBHOOK_STATUS_SCRIPT, Keys, absolute_urls, job_view, read_job

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "Hearth-Signature"
DRAIN_TIMEOUT_S = 10.0


class DeliveryFailed(Exception):
    pass


def signature(secret: str, body: bytes, timestamp: int) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


class WebhookSender:
    def __init__(self, settings: Settings, redis: Redis, keys: Keys) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = keys
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None

    def send(self, job_id: str, url: str) -> None:
        """Deliver in the background; the batch that ended the job does not wait."""
        task = asyncio.create_task(self.deliver(job_id, url))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def deliver(self, job_id: str, url: str) -> None:
        """POST the job as its record shows it, retrying; note how that went on the record."""
        view = job_view(job_id, await read_job(self.redis, self.keys, job_id))
        if view is None:  # expired already (a TTL shorter than the run): nothing to tell
            logger.warning("job %s: no webhook to %s, its record is gone", job_id, url)
            return
        body = orjson.dumps(absolute_urls(view, self.settings.public_url))
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=10.0)
        status = "delivered"
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.settings.webhook_attempts),
                wait=wait_exponential(multiplier=0.5, max=30),
                retry=retry_if_exception_type((DeliveryFailed, httpx.HTTPError)),
                reraise=True,
            ):
                with attempt:
                    await self._post(url, body, job_id)
        except (DeliveryFailed, httpx.HTTPError) as exc:
            status = "failed"
            logger.warning("job %s: webhook to %s failed for good: %s", job_id, url, exc)
        await self.redis.eval(WEBHOOK_STATUS_SCRIPT, 1, self.keys.job(job_id), status)

    async def _post(self, url: str, body: bytes, job_id: str) -> None:
        assert self._client is not None
        headers = {"Content-Type": "application/json", "Hearth-Job-Id": job_id}
        if self.settings.webhook_secret is not None:
            secret = self.settings.webhook_secret.get_secret_value()
            headers[SIGNATURE_HEADER] = signature(secret, body, int(time.time()))
        response = await self._client.post(url, content=body, headers=headers)
        if not response.is_success:
            raise DeliveryFailed(f"HTTP {response.status_code}")

    async def drain(self) -> None:
        """On shutdown: give deliveries in flight a moment, then stop."""
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=DRAIN_TIMEOUT_S)
            for task in pending:
                task.cancel()
        if self._client is not None:
            await self._client.aclose()
