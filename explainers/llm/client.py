"""An OpenAI-compatible LLM client (the ``openai`` package's ``AsyncOpenAI``) with a cache, bounded
concurrency, retries and reply parsing.

Every call goes through :class:`~explainers.llm.cache.LLMCache`. A call is tried in *attempts*: attempt 0
with the caller's parameters, each further attempt (after a reply that did not parse) with
``retry_temperature`` and ``seed=attempt``, so a deterministic endpoint can give a different reply. Each
attempt's reply is cached under its own key, so a rerun replays the same attempts from the cache and pays
nothing. When no attempt parses, the result is a failure with the last reason (never an empty value).

Transport errors are retried within an attempt with exponential backoff (``backoff_s * 2**n``, jitter
+-25 %, at most ``max_backoff_s``): HTTP 429 (waiting what ``Retry-After`` / ``retry-after-ms`` asks when
given), 5xx, timeouts and connection errors. When the retries run out the call raises
:class:`LLMUnavailableError`, which aborts the run; the replies cached so far stay, so rerunning resumes.
Other 4xx replies (bad request, unknown model) raise :class:`LLMRequestError` at once. A body that is not
valid JSON counts as a reply that does not parse (not cached).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from tqdm.auto import tqdm

from explainers.llm.cache import LLMCache

logger = logging.getLogger(__name__)
T = TypeVar("T")


class LLMUnavailableError(RuntimeError):
    """The endpoint did not answer (connection refused, timeouts, 5xx or 429) after every retry."""


class LLMRequestError(RuntimeError):
    """The endpoint refused the request (4xx other than 429): retrying would not help."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class LLMConfig:
    """Where and how to call. ``base_url`` / ``api_key`` default to ``$OPENAI_BASE_URL`` / ``$OPENAI_API_KEY``
    (a key ``EMPTY`` when neither is set: vLLM accepts any); ``model`` is the endpoint's model name."""

    base_url: str | None = None
    api_key: str | None = None
    model: str | None = None
    concurrency: int = 16
    timeout_s: float = 300.0
    max_retries: int = 6
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_retry_after_s: float = 300.0
    parse_retries: int = 2
    retry_temperature: float = 0.7

    def resolved(self) -> LLMConfig:
        base_url = self.base_url or os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            raise ValueError("no LLM endpoint: pass --llm-base-url (e.g. the URL `circuitexplain llm serve` prints) "
                             "or set OPENAI_BASE_URL")
        if not self.model:
            raise ValueError(f"no LLM model name for {base_url}: pass --llm-model")
        if self.concurrency < 1:
            raise ValueError(f"LLM concurrency must be >= 1, got {self.concurrency}")
        if self.max_retries < 0 or self.parse_retries < 0:
            raise ValueError("LLM max_retries and parse_retries must be >= 0")
        key = self.api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        return replace(self, base_url=base_url.rstrip("/"), api_key=key)


@dataclass(frozen=True)
class LLMReply(Generic[T]):
    """A parsed reply (``value``) or a failure (``failed``: the reason the last attempt did not parse)."""

    value: T | None
    failed: str | None
    attempts: int
    fetched: int  # attempts answered by the endpoint (the others came from the cache)
    text: str | None = None

    @property
    def ok(self) -> bool:
        return self.failed is None

    @property
    def cached(self) -> bool:
        return self.fetched == 0


def chat_text(reply: Mapping[str, Any]) -> str | None:
    """The message text of a chat-completions reply."""
    try:
        return reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"not a chat-completions reply ({type(e).__name__}: {e})") from e


def completion_text(reply: Mapping[str, Any]) -> str | None:
    try:
        return reply["choices"][0]["text"]
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"not a completions reply ({type(e).__name__}: {e})") from e


def _retry_after(error: Exception) -> float | None:
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None) or {}
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:  # an HTTP date
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class LLMClient:
    """``await chat(...)`` / ``await completion(...)`` from coroutines; ``run(coroutines)`` drives them.

    ``stats`` counts ``requests`` (HTTP requests sent, retries included), ``replies`` (valid replies
    received), ``cache_hits``, ``retries`` (transport), ``unparsed`` (replies that did not parse) and
    ``failed`` (calls recorded as failed)."""

    def __init__(self, config: LLMConfig, cache: LLMCache | str | os.PathLike | None = None,
                 *, seed: int = 0):
        self.config = config.resolved()
        self.cache = cache if isinstance(cache, LLMCache) else LLMCache(cache)
        self.stats: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._semaphore: asyncio.Semaphore | None = None

    @property
    def model(self) -> str:
        return str(self.config.model)

    # -------------------------------------------------------------------------------------------- public
    async def chat(self, messages: Sequence[Mapping[str, str]], *, fmt: str, parse: Callable[[dict], T],
                   max_tokens: int = 64, temperature: float = 0.0, top_logprobs: int | None = None,
                   parse_retries: int | None = None) -> LLMReply[T]:
        """A chat completion; ``parse(reply_dict)`` returns the value or raises ``ValueError(reason)``;
        ``parse_retries`` overrides the config's (0 where a new attempt cannot change the reply)."""
        params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature}
        if top_logprobs is not None:
            params.update(logprobs=True, top_logprobs=top_logprobs)
        return await self._call("chat", {"messages": [dict(m) for m in messages]}, params, fmt, parse,
                                parse_retries)

    async def completion(self, prompt: str, *, fmt: str, parse: Callable[[dict], T], max_tokens: int = 0,
                         temperature: float = 0.0, echo: bool = False, logprobs: int | None = None,
                         parse_retries: int | None = None) -> LLMReply[T]:
        """A (legacy) completion; with ``echo=True, logprobs=k, max_tokens=0`` the prompt's own log-probs."""
        params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature, "echo": echo}
        if logprobs is not None:
            params["logprobs"] = logprobs
        return await self._call("completion", {"prompt": prompt}, params, fmt, parse, parse_retries)

    def run(self, calls: Iterable[Awaitable[T]], *, desc: str = "LLM", progress: bool = True) -> list[T]:
        """Run coroutines concurrently (the semaphore bounds requests in flight), with a progress bar that
        shows cache hits and requests; results in input order. The first ``LLMUnavailableError`` /
        ``LLMRequestError`` cancels the rest and is raised (replies received so far are cached)."""
        return asyncio.run(self.gather(calls, desc=desc, progress=progress))

    async def gather(self, calls: Iterable[Awaitable[T]], *, desc: str = "LLM", progress: bool = True) -> list[T]:
        tasks = [asyncio.ensure_future(c) for c in calls]
        try:
            with tqdm(total=len(tasks), desc=desc, disable=not progress, leave=False) as bar:
                for fut in asyncio.as_completed(tasks):
                    await fut
                    bar.update()
                    bar.set_postfix(cache_hits=self.stats["cache_hits"], requests=self.stats["requests"],
                                    refresh=False)
            return [t.result() for t in tasks]
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.aclose()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
        self._client, self._loop, self._semaphore = None, None, None

    def close(self) -> None:
        self.cache.close()

    # ----------------------------------------------------------------------------------------- internals
    def _ensure_client(self) -> tuple[Any, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            from openai import AsyncOpenAI

            self._client = AsyncOpenAI(base_url=self.config.base_url, api_key=self.config.api_key,
                                       max_retries=0, timeout=self.config.timeout_s)
            self._loop = loop
            self._semaphore = asyncio.Semaphore(self.config.concurrency)
        assert self._semaphore is not None
        return self._client, self._semaphore

    async def _call(self, kind: str, payload: dict[str, Any], params: dict[str, Any], fmt: str,
                    parse: Callable[[dict], T], parse_retries: int | None = None) -> LLMReply[T]:
        fetched, reason, text = 0, "", None
        n_attempts = 1 + (self.config.parse_retries if parse_retries is None else parse_retries)
        for attempt in range(n_attempts):
            p = dict(params) if attempt == 0 else {**params, "temperature": self.config.retry_temperature,
                                                   "seed": attempt}
            request = {"model": self.model, "kind": kind, "format": fmt, **payload, "params": p, "attempt": attempt}
            reply = self.cache.get(request)
            if reply is not None:
                self.stats["cache_hits"] += 1
            else:
                try:
                    reply = await self._fetch(kind, payload, p)
                except _Malformed as e:
                    reason = f"malformed reply: {e}"
                    self.stats["unparsed"] += 1
                    fetched += 1
                    continue
                self.cache.put(request, reply)
                fetched += 1
            try:
                text = _text(kind, reply)
                value = parse(reply)
            except ValueError as e:
                reason = str(e)
                self.stats["unparsed"] += 1
                logger.debug("attempt %d of a %s call did not parse: %s", attempt, fmt, reason)
                continue
            return LLMReply(value=value, failed=None, attempts=attempt + 1, fetched=fetched, text=text)
        self.stats["failed"] += 1
        return LLMReply(value=None, failed=reason, attempts=n_attempts, fetched=fetched, text=text)

    async def _fetch(self, kind: str, payload: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        import openai

        client, semaphore = self._ensure_client()
        args = {"model": self.model, **payload, **params}
        last = ""
        for n in range(self.config.max_retries + 1):
            wait = None
            async with semaphore:
                self.stats["requests"] += 1
                try:
                    if kind == "chat":
                        response = await client.chat.completions.create(**args)
                    else:
                        response = await client.completions.create(**args)
                except openai.APIResponseValidationError as e:
                    raise _Malformed(str(e)[:200]) from e
                except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as e:
                    last = _describe(e)
                    wait = _retry_after(e) if isinstance(e, openai.RateLimitError) else None
                except openai.APIStatusError as e:
                    if e.status_code >= 500 or e.status_code in (408, 409):
                        last = _describe(e)
                    else:
                        raise LLMRequestError(f"{self.config.base_url} refused a {kind} request for model "
                                              f"{self.model}: {_describe(e)}", status=e.status_code) from e
                except ValueError as e:  # a body that is not JSON
                    raise _Malformed(f"{type(e).__name__}: {str(e)[:200]}") from e
                else:
                    if isinstance(response, str | bytes):
                        raise _Malformed(f"not JSON: {str(response)[:80]!r}")
                    self.stats["replies"] += 1
                    return response.model_dump(mode="json")
            if n == self.config.max_retries:
                break
            self.stats["retries"] += 1
            backoff = min(self.config.max_backoff_s, self.config.backoff_s * 2 ** n) * self._rng.uniform(0.75, 1.25)
            delay = min(wait, self.config.max_retry_after_s) if wait is not None else backoff
            logger.info("LLM %s request failed (%s); retry %d in %.1f s", kind, last, n + 1, delay)
            await asyncio.sleep(delay)
        raise LLMUnavailableError(f"LLM endpoint {self.config.base_url} (model {self.model}) failed after "
                                  f"{self.config.max_retries + 1} tries: {last}; rerun to resume from the cache")


class _Malformed(Exception):
    pass


def _describe(e: Exception) -> str:
    status = getattr(e, "status_code", None)
    cause = e.__cause__ or e.__context__
    detail = f" ({type(cause).__name__}: {cause})" if cause is not None and not status else ""
    return (f"HTTP {status} " if status else "") + f"{type(e).__name__}{detail}"[:300]


def _text(kind: str, reply: Mapping[str, Any]) -> str | None:
    try:
        return chat_text(reply) if kind == "chat" else completion_text(reply)
    except ValueError:
        return None
