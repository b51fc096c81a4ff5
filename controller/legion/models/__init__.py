"""Models: anything with ``async complete(messages) -> ModelReply``.

:class:`LiteLLMModel` reaches any model litellm knows (``provider/model``),
with a timeout and bounded retries on rate limits, server errors and
connection failures. litellm is imported on the first request: ``import
legion`` stays fast and makes no network look-ups.

Test suites can refuse real vendor requests with
:func:`legion.testing.forbid_model_requests`; requests to a loopback
``api_base`` (such as :class:`legion.testing.FakeOpenAIServer`) stay allowed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlparse

from .._log import get_logger
from .._net import is_loopback_host
from .._results import Usage
from ..errors import ModelError, UsageError

__all__ = ["LiteLLMModel", "Model", "ModelReply", "Usage", "model_override"]

log = get_logger("legion.models")

_requests_allowed = True
_overrides: ContextVar[Callable[[str], Model | None] | None] = ContextVar(
    "legion_model_overrides", default=None
)


def model_override(agent: str) -> Model | None:
    """The model that :func:`legion.testing.use_models` put in place for runs
    of ``agent`` in this context (sub-agents and turns included), if any."""
    choose = _overrides.get()
    return choose(agent) if choose is not None else None


@dataclass(frozen=True)
class ModelReply:
    content: str
    usage: Usage
    model: str


@runtime_checkable
class Model(Protocol):
    """What a run needs from a model."""

    name: str

    async def complete(self, messages: Sequence[dict[str, str]]) -> ModelReply: ...


def _is_loopback(api_base: str | None) -> bool:
    if not api_base:
        return False
    return is_loopback_host(urlparse(api_base).hostname or "")


def _retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    try:
        value = headers.get("retry-after") or headers.get("Retry-After")
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


class LiteLLMModel:
    """A model reached through ``litellm.acompletion``."""

    def __init__(
        self,
        model: str,
        *,
        api_base: str | None = None,
        api_key: str | None = None,
        temperature: float | None = None,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
    ) -> None:
        self.name = model
        self.api_base = api_base
        self._api_key = api_key
        self.temperature = temperature
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff

    async def complete(self, messages: Sequence[dict[str, str]]) -> ModelReply:
        if not _requests_allowed and not _is_loopback(self.api_base):
            raise UsageError(
                f"a real model request to {self.name!r} was refused: model requests are "
                "forbidden here (legion.testing.forbid_model_requests). Use "
                "legion.testing.ScriptedModel or FakeOpenAIServer, or allow them explicitly."
            )
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        import litellm  # noqa: PLC0415 - seconds to import; only when a model is called

        # Otherwise litellm prints help banners to stdout on errors and on
        # price look-ups of models it does not know.
        litellm.suppress_debug_info = True

        from litellm import exceptions as errors  # noqa: PLC0415

        retryable = (
            errors.RateLimitError,
            errors.InternalServerError,
            errors.ServiceUnavailableError,
            errors.BadGatewayError,
            errors.APIConnectionError,
            errors.Timeout,
        )
        kwargs: dict[str, Any] = {
            "model": self.name,
            "messages": list(messages),
            "timeout": self.timeout,
            "num_retries": 0,
        }
        if self.api_base:
            kwargs["api_base"] = self.api_base
        if self._api_key:
            kwargs["api_key"] = self._api_key
        if self.temperature is not None:
            kwargs["temperature"] = self.temperature
        for attempt in range(self.retries + 1):
            try:
                response = await litellm.acompletion(**kwargs)
                break
            except retryable as exc:
                if attempt == self.retries:
                    raise ModelError(
                        f"model {self.name} failed after {attempt + 1} attempts: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                delay = _retry_after(exc) or self.backoff * 2**attempt
                log.warning(
                    "model_request_retry",
                    model=self.name,
                    attempt=attempt + 1,
                    error=type(exc).__name__,
                    delay=delay,
                )
                await asyncio.sleep(delay)
            except Exception as exc:  # auth, bad request, unknown model: retrying won't help
                raise ModelError(
                    f"model {self.name} refused the request: {type(exc).__name__}: {exc}"
                ) from exc
        choice = response.choices[0] if response.choices else None
        content = (choice.message.content if choice is not None else None) or ""
        raw = getattr(response, "usage", None)
        cost: float | None
        try:
            cost = float(litellm.completion_cost(completion_response=response))
        except Exception:
            cost = None  # litellm does not know this model's price
        usage = Usage(
            prompt_tokens=int(getattr(raw, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(raw, "completion_tokens", 0) or 0),
            total_tokens=int(getattr(raw, "total_tokens", 0) or 0),
            cost_usd=cost,
            requests=1,
        )
        return ModelReply(content=content, usage=usage, model=str(getattr(response, "model", "")))
