"""Turn huggingface_hub's request failures into the short descriptions and fixes that HubError carries."""

from __future__ import annotations

import importlib


def request_failures() -> tuple[type[BaseException], ...]:
    """Return the exception types of a failed Hub request: HTTP errors, refused connections and timeouts.

    The client's HTTP library differs between huggingface_hub releases (httpx2 in 2.4), so the
    transport errors of httpx2 and httpx, which do not derive from OSError, are added when
    importable. HTTP errors (`HfHubHTTPError`), requests' connection errors and offline mode
    (`OfflineModeIsEnabled`) derive from OSError.
    """
    failures: list[type[BaseException]] = [OSError]
    for module_name in ("httpx2", "httpx"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        failures.append(module.TransportError)
    return tuple(failures)


def status_of(error: BaseException) -> int | None:
    """Return the HTTP status of a failed Hub request, or None when no response came back."""
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def describe(error: BaseException, *, token: str | None) -> str:
    """Describe a failed request in one line: the HTTP status and the server's message, or the connection error.

    The text has no final period, so that callers can continue it with a sentence of their own.
    """
    status = status_of(error)
    if status is not None:
        server_message = getattr(error, "server_message", None)
        detail = "; ".join(server_message.splitlines()) if server_message else _first_line(str(error))
        text = f"HTTP {status}: {detail}"
    else:
        text = f"{type(error).__name__}: {_first_line(str(error))}"
    return redact(text.rstrip(". "), token)


def hint_for(error: BaseException, *, repo_id: str) -> str:
    """Return the next step after a failed request, from its HTTP status."""
    namespace = repo_id.split("/")[0]
    status = status_of(error)
    if status == 401:
        return "check the token: set HF_TOKEN to a valid token, or run `hf auth login`"
    if status == 403:
        return f"use a token with write access to {namespace} (a fine-grained token needs write permission there)"
    if status == 404:
        return f"check that the repo id {repo_id} is right and that the token's user can see that repo"
    if status == 400:
        return "the Hub rejected the request as invalid; fix what the message names, then retry"
    if status in (409, 412):
        return "someone else changed the repo or branch during the upload; retry"
    if status == 429:
        return "the Hub is limiting this token's requests; wait a few minutes, then retry"
    return "the Hub or the network failed; retry"


def redact(text: str, token: str | None) -> str:
    """Replace every occurrence of `token` in `text`, so a server message that echoes it prints nothing secret."""
    if token:
        return text.replace(token, "<token>")
    return text


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else "no details"
