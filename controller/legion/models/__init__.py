"""Models: anything with ``async complete(messages) -> ModelReply``.

:class:`LiteLLMModel` reaches any model litellm knows (``provider/model``),
with a timeout and bounded retries on rate limits, server errors and
connection failures. litellm is imported on the first request: ``import
legion`` stays fast and makes no network look-ups.

While someone is subscribed to :mod:`legion.telemetry`, the reply is streamed
and its text goes out as ``llm.delta`` events as it arrives; the action is
still parsed from the complete reply, so streaming changes nothing else. A
provider that refuses to stream is asked again without streaming, and not
asked to stream again by this process.

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

from .. import telemetry
from .._log import get_logger
from .._net import is_loopback_host
from .._results import Usage
from ..errors import ModelError, UsageError
from ._stream import DeltaFeed

__all__ = ["LiteLLMModel", "Model", "ModelReply", "Usage", "model_override"]

log = get_logger("legion.models")

_requests_allowed = True
_unstreamable: set[tuple[str, str | None]] = set()
"""(model, api_base) pairs whose provider refused a streamed request."""
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
    """A model reached through ``litellm.acompletion``.

    ``timeout`` bounds each attempt as a whole, a streamed reply included.
    ``stream=False`` never streams (no ``llm.delta`` events).
    """

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
        stream: bool = True,
    ) -> None:
        self.name = model
        self.api_base = api_base
        self._api_key = api_key
        self.temperature = temperature
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.stream = stream

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
            TimeoutError,  # a streamed reply that did not end within the timeout
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
        key = (self.name, self.api_base)
        for attempt in range(self.retries + 1):
            try:
                if self.stream and telemetry.active() and key not in _unstreamable:
                    response = await self._streamed(litellm, kwargs, attempt + 1)
                else:
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

    async def _streamed(self, litellm: Any, kwargs: dict[str, Any], attempt: int) -> Any:
        """The response of a streamed request, put together from its chunks;
        without streaming when the provider refuses it."""
        from litellm import exceptions as errors  # noqa: PLC0415

        feed = DeltaFeed(attempt)
        try:
            async with asyncio.timeout(self.timeout):
                stream = await litellm.acompletion(
                    **kwargs, stream=True, stream_options={"include_usage": True}
                )
                try:
                    chunks = []
                    async for chunk in stream:
                        chunks.append(chunk)
                        feed.add(_delta_text(chunk))
                finally:
                    await stream.aclose()
        except TimeoutError:
            raise TimeoutError(f"no complete reply within {self.timeout:g} s") from None
        except (errors.BadRequestError, errors.UnprocessableEntityError) as exc:
            if isinstance(exc, _not_about_streaming(errors)):
                raise
            # Likely a provider (or proxy) that cannot stream: ask it plainly.
            # Remembered only once the plain request works, so a request that
            # is bad either way is not taken for a refusal to stream.
            response = await litellm.acompletion(**kwargs)
            _unstreamable.add((self.name, self.api_base))
            log.info("model_streaming_refused", model=self.name, error=type(exc).__name__)
            return response
        feed.close()
        response = litellm.stream_chunk_builder(chunks, messages=kwargs["messages"])
        if response is None:  # no chunk at all: as a dropped connection, retried
            raise errors.APIConnectionError(
                message="the reply stream ended without a chunk", llm_provider="", model=self.name
            )
        return response


def _not_about_streaming(errors: Any) -> tuple[type[BaseException], ...]:
    """Refusals that a request without streaming would get too."""
    return (
        errors.ContextWindowExceededError,
        errors.ContentPolicyViolationError,
        errors.PaymentRequiredError,
        errors.LiteLLMUnknownProvider,
    )


def _delta_text(chunk: Any) -> str:
    choices = getattr(chunk, "choices", None) or []
    delta = getattr(choices[0], "delta", None) if choices else None
    text = getattr(delta, "content", None)
    return text if isinstance(text, str) else ""
