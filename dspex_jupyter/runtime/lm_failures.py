"""Which exceptions mean "the LM provider failed" rather than "the program failed".

An exception raised while a DSPy program runs in a pool kernel may come from the LM
provider (a wrong key, a rate limit that outlived DSPy's retries, an outage, a timeout, an
unknown model) or from the program itself (a bug, a prompt over the context window, a
content-policy refusal: DSPy too treats those as the program's). ``lm_failure`` tells them
apart, so the notebook side can raise a typed error with a remedy, and a run can pause on an
outage instead of scoring zeros.

Standard library only, as the whole runtime: exceptions are recognised by the module and
name of the classes in their MRO (no DSPy import), then by an HTTP status for client
libraries DSPy may sit on (``engine="litellm"``, the ``openai`` SDK, ``httpx``). Rows were
checked against DSPy 3.4.1's native engine talking to ``testing.lm_server`` over real HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = [
    "AUTH",
    "BILLING",
    "KINDS",
    "MODEL_NOT_FOUND",
    "RATE_LIMITED",
    "TIMEOUT",
    "UNAVAILABLE",
    "lm_failure",
    "lm_failure_details",
    "lm_failure_of_type",
    "provider_env_var",
]

AUTH = "auth"
BILLING = "billing"
RATE_LIMITED = "rate_limited"
UNAVAILABLE = "unavailable"
TIMEOUT = "timeout"
MODEL_NOT_FOUND = "model_not_found"
KINDS: tuple[str, ...] = (AUTH, BILLING, RATE_LIMITED, UNAVAILABLE, TIMEOUT, MODEL_NOT_FOUND)

_PROGRAM = "program"  # a verdict that stops the search: the program's own failure
_TRANSPORT = "transport"  # unavailable, or a timeout when the cause chain says so

_DSPY = "dspy.utils.exceptions"
_LM15 = "dspy._vendor.lm15.errors"
_LITELLM = "litellm.exceptions"
_OPENAI = "openai"
_HTTPX = "httpx"

# (module, class name) -> kind. Looked up along each exception's MRO, most specific first,
# so a subclass (ContextWindowExceededError under LMInvalidRequestError) meets its own row.
_BY_TYPE: dict[tuple[str, str], str] = {
    # DSPy 3.4 public errors (dspy.clients.errors.wrap_error projects lm15 errors to these)
    (_DSPY, "LMNotConfiguredError"): AUTH,  # no key anywhere: raised before any request
    (_DSPY, "LMAuthError"): AUTH,
    (_DSPY, "LMBillingError"): BILLING,
    (_DSPY, "LMRateLimitError"): RATE_LIMITED,
    (_DSPY, "LMServerError"): UNAVAILABLE,
    (_DSPY, "LMTimeoutError"): TIMEOUT,
    (_DSPY, "LMTransportError"): _TRANSPORT,
    (_DSPY, "LMUnsupportedModelError"): MODEL_NOT_FOUND,
    (_DSPY, "ContextWindowExceededError"): _PROGRAM,
    (_DSPY, "LMInvalidRequestError"): _PROGRAM,  # content policy, bad parameters
    # lm15's canonical errors (what custom engines raise; DSPy wraps them at its boundary)
    (_LM15, "NotConfiguredError"): AUTH,
    (_LM15, "AuthError"): AUTH,
    (_LM15, "BillingError"): BILLING,
    (_LM15, "RateLimitError"): RATE_LIMITED,
    (_LM15, "ServerError"): UNAVAILABLE,
    (_LM15, "TimeoutError"): TIMEOUT,
    (_LM15, "TransportError"): _TRANSPORT,
    (_LM15, "UnsupportedModelError"): MODEL_NOT_FOUND,
    (_LM15, "ContextLengthError"): _PROGRAM,
    (_LM15, "InvalidRequestError"): _PROGRAM,
    # LiteLLM (dspy.LM(..., engine="litellm"))
    (_LITELLM, "AuthenticationError"): AUTH,
    (_LITELLM, "PermissionDeniedError"): AUTH,
    (_LITELLM, "RateLimitError"): RATE_LIMITED,
    (_LITELLM, "ServiceUnavailableError"): UNAVAILABLE,
    (_LITELLM, "InternalServerError"): UNAVAILABLE,
    (_LITELLM, "BadGatewayError"): UNAVAILABLE,
    (_LITELLM, "APIConnectionError"): UNAVAILABLE,
    (_LITELLM, "Timeout"): TIMEOUT,
    (_LITELLM, "NotFoundError"): MODEL_NOT_FOUND,
    (_LITELLM, "ContextWindowExceededError"): _PROGRAM,
    (_LITELLM, "ContentPolicyViolationError"): _PROGRAM,
    (_LITELLM, "BadRequestError"): _PROGRAM,
    # The openai SDK and httpx, for engines built on them
    (f"{_OPENAI}._exceptions", "AuthenticationError"): AUTH,
    (f"{_OPENAI}._exceptions", "PermissionDeniedError"): AUTH,
    (f"{_OPENAI}._exceptions", "RateLimitError"): RATE_LIMITED,
    (f"{_OPENAI}._exceptions", "InternalServerError"): UNAVAILABLE,
    (f"{_OPENAI}._exceptions", "APIConnectionError"): UNAVAILABLE,
    (f"{_OPENAI}._exceptions", "APITimeoutError"): TIMEOUT,
    (f"{_OPENAI}._exceptions", "NotFoundError"): MODEL_NOT_FOUND,
    (f"{_OPENAI}._exceptions", "BadRequestError"): _PROGRAM,
    (_HTTPX, "TimeoutException"): TIMEOUT,
    (_HTTPX, "TransportError"): UNAVAILABLE,
}

# An HTTP status on an exception from a known LM client library (``status`` or
# ``status_code``), when its type has no row above.
_BY_STATUS: dict[int, str] = {
    401: AUTH,
    403: AUTH,
    402: BILLING,
    404: MODEL_NOT_FOUND,
    408: TIMEOUT,
    504: TIMEOUT,
    429: RATE_LIMITED,
    500: UNAVAILABLE,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
}
_LM_CLIENT_MODULES = ("dspy", "litellm", "openai", "httpx", "anthropic", "google.genai")

# In a transport failure's cause chain, these mean "it waited and gave up": a timeout.
_TIMEOUT_CAUSES: frozenset[tuple[str, str]] = frozenset(
    {
        ("dspy._vendor.lm15.transports._exceptions", "ReadTimeout"),
        ("dspy._vendor.lm15.transports._exceptions", "ConnectTimeout"),
        ("dspy._vendor.lm15.transports._exceptions", "WriteTimeout"),
        ("dspy._vendor.lm15.transports._exceptions", "PoolTimeout"),
        ("builtins", "TimeoutError"),
        ("socket", "timeout"),
    }
)

# Provider prefix of a DSPy model string -> the environment variable its client reads.
PROVIDER_ENV_VARS: dict[str, str] = {
    "openai": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "gemini": "GEMINI_API_KEY",
    "groq": "GROQ_API_KEY",
    "mistral": "MISTRAL_API_KEY",
    "deepseek": "DEEPSEEK_API_KEY",
    "together_ai": "TOGETHERAI_API_KEY",
    "openrouter": "OPENROUTER_API_KEY",
    "xai": "XAI_API_KEY",
    "cohere": "COHERE_API_KEY",
    "fireworks_ai": "FIREWORKS_AI_API_KEY",
    "perplexity": "PERPLEXITYAI_API_KEY",
    "azure": "AZURE_API_KEY",
    "databricks": "DATABRICKS_TOKEN",
}
_MAX_CHAIN = 16


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, then its causes (explicit first, else implicit context)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < _MAX_CHAIN:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _type_names(exc: BaseException) -> Iterator[tuple[str, str]]:
    for cls in type(exc).__mro__:
        yield cls.__module__, cls.__qualname__


def _verdict(exc: BaseException) -> str | None:
    for module, name in _type_names(exc):
        kind = _BY_TYPE.get((module, name))
        # The openai SDK and httpx re-export their errors under the package name.
        if kind is None and module.split(".")[0] == _OPENAI:
            kind = _BY_TYPE.get((f"{_OPENAI}._exceptions", name))
        if kind is None and module.split(".")[0] == _HTTPX:
            kind = _BY_TYPE.get((_HTTPX, name))
        if kind is not None:
            return kind
    module = type(exc).__module__
    if module.split(".")[0] in {m.split(".")[0] for m in _LM_CLIENT_MODULES}:
        status = _attr(exc, "status") or _attr(exc, "status_code")
        if isinstance(status, int):
            return _BY_STATUS.get(status)
    return None


def _attr(item: BaseException, name: str) -> Any:
    """An attribute of a foreign exception; a property that fails reads as absent."""
    try:
        return getattr(item, name, None)
    except Exception:
        return None


def _waited_too_long(exc: BaseException) -> bool:
    return any(any(name in _TIMEOUT_CAUSES for name in _type_names(cause)) for cause in _chain(exc))


def lm_failure(exc: BaseException) -> str | None:
    """The kind of LM provider failure behind ``exc`` (one of ``KINDS``), or None.

    None means the failure is the program's own (including a prompt over the context
    window or a content-policy refusal) or not an LM failure at all. The first exception
    along the cause chain that the table knows decides.
    """
    for item in _chain(exc):
        kind = _verdict(item)
        if kind is None:
            continue
        if kind == _PROGRAM:
            return None
        if kind == _TRANSPORT:
            return TIMEOUT if _waited_too_long(item) else UNAVAILABLE
        return kind
    return None


def lm_failure_of_type(module: str, name: str, message: str = "") -> str | None:
    """``lm_failure`` for an error known only by its type and message, as a kernel's
    execute reply reports it (``ename``, without the module or the cause chain): DSPy's
    public error names are distinctive enough to be recognised without their module."""
    kind = _BY_TYPE.get((module, name))
    if kind is None and module in ("", "builtins"):
        kind = _BY_TYPE.get((_DSPY, name))
    if kind == _TRANSPORT:
        return TIMEOUT if "timed out" in message.lower() else UNAVAILABLE
    return None if kind == _PROGRAM else kind


def provider_env_var(model: str | None) -> str | None:
    """``OPENAI_API_KEY`` for ``"openai/gpt-4o-mini"``: the key variable of a model's provider."""
    if not model or "/" not in model:
        return None
    return PROVIDER_ENV_VARS.get(model.split("/", 1)[0].lower())


def lm_failure_details(exc: BaseException) -> dict[str, Any]:
    """What the notebook side needs to explain an LM failure (empty when it is none).

    Plain JSON, no secrets: the kind, the model, the provider, the key variable to set,
    the HTTP status and a provider's Retry-After hint when the exception carries them.
    """
    kind = lm_failure(exc)
    if kind is None:
        return {}
    details: dict[str, Any] = {"lm_failure": kind}
    for item in _chain(exc):
        model = _attr(item, "model")
        if isinstance(model, str) and model and "lm_model" not in details:
            details["lm_model"] = model
        provider = _attr(item, "provider")
        if isinstance(provider, str) and provider and "lm_provider" not in details:
            details["lm_provider"] = provider
        status = _attr(item, "status")
        if isinstance(status, int) and "lm_status" not in details:
            details["lm_status"] = status
        retry_after = _attr(item, "retry_after")
        if isinstance(retry_after, (int, float)) and "lm_retry_after" not in details:
            details["lm_retry_after"] = float(retry_after)
        env_keys = _attr(item, "env_keys")
        if env_keys and "lm_env_var" not in details:
            details["lm_env_var"] = str(next(iter(env_keys)))
    if "lm_env_var" not in details:
        # "openai/gpt-4o-mini" names its provider; LiteLLM's errors say "openai" apart.
        provider = str(details.get("lm_provider", "")).split("-")[0]
        env_var = provider_env_var(details.get("lm_model")) or provider_env_var(f"{provider}/")
        if env_var:
            details["lm_env_var"] = env_var
    return details
