"""The one place where exceptions become registry errors, as Falcon error handlers.

Modules below the HTTP layer raise what they know, with no status: `image`'s
`InvalidName`/`InvalidTag`/`InvalidDigest`/`TooManyComponents`, a source's
`UnknownTag`/`RefusedTag`/`SourceUnavailable`, the builder's refusals
(`BuildRefused`, `TooManyBuilds`, `ImageTooLarge`: nixery/refusals.py), a
`StorageError` when the backend fails, Nix's own errors when a build fails;
only the HTTP resources raise `RegistryError`s themselves. Each type gets a
handler here that renders the distribution spec's JSON error body, so the wording a client sees (and the
build history records) is decided once, and no code path answers with HTML
or a bare status below `/v2/`.

The status says whose fault it is. Docker's and skopeo's registry clients read
the body of a 4xx answer and print its message, but show only "received
unexpected HTTP status" for a 5xx; so every failure that the same request
will meet again (a name the set lacks or refuses, a package whose build
fails, a system this instance cannot build for, a tag the source does not
serve) is a 4xx whose message is the reason in one line, and only what is
transient or the operator's to fix (storage, Nix itself, a download, a local
package set that does not parse, a bug) is 5xx. A build that fails or times out
and a revision that does not evaluate are 422, not 403 or 404: the request was
understood and the build was tried, and the instance's history counts them with
the builds that failed (they may need the operator: a timeout too short for a
big package), apart from the requests it refused:

| failure | status | code |
| --- | --- | --- |
| a name, tag or digest outside the spec's grammar; a name of no packages | 400 | NAME_INVALID, TAG_INVALID, DIGEST_INVALID |
| unknown, removed or renamed package, not a package, unsupported system, a tag the source lacks | 404 | MANIFEST_UNKNOWN |
| unfree, broken or insecure package (the set's config refuses it) | 403 | DENIED |
| over a bound of the instance: a name's components, an image's size, an evaluation's memory or time | 403 | DENIED |
| a package's build fails (its builder exits non-zero), or runs past NIX_TIMEOUT | 422 | UNKNOWN |
| a fixed revision (a git commit, a nixpkgs commit) whose code does not evaluate | 422 | UNKNOWN |
| the set's declaration of the image is invalid (nixery/declared.py) | 422 | MANIFEST_INVALID |
| the set's code reads a file or URL it may not (restricted evaluation) | 403 | DENIED |
| Nix cannot run, a local set or channel that does not evaluate, a download, a builder killed, a git fetch fails | 500 | UNKNOWN |
| an anonymous client would make the instance build (auth level `build`) | 401 | UNAUTHORIZED |
| storage fails | 503 | UNAVAILABLE |
| a new build asked of a stopping server | 503 | UNAVAILABLE |
| a client over its share of new builds (NIXERY_CLIENT_BUILDS) | 429 | TOOMANYREQUESTS |
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import falcon

from . import image
from .config import format_size
from .declared import InvalidDeclaration
from .errors import RegistryError, build_failed, internal_error, manifest_unknown, unavailable
from .nix import (BuildFailed, BuildTimedOut, EvaluationFailed, EvaluationLimit, Forbidden, NixError, Problem,
                  UnavailablePackages, UnknownPackages, UnsupportedSystem, advice)
from .parking import Parked
from .refusals import BuildRefused, ImageTooLarge, ServerStopping, TooManyBuilds
from .sources import RefusedTag, SourceUnavailable, UnknownTag
from .stats import BUILD_FAILED_STATUS
from .storage import StorageError

log = logging.getLogger(__name__)

# The set's refusals that its configuration decides (403); every other problem is 404.
_DENIED_KINDS = frozenset({"unfree", "broken", "insecure"})


def _unknown_text(error: UnknownPackages) -> str:
    """`unknown packages: hellp (did you mean hello?), nosuch`."""
    def one(name: str) -> str:
        close = error.suggestions.get(name)
        return f"{name} (did you mean {' or '.join(close)}?)" if close else name
    where = f" (named by the package set's declaration of image {error.declared_by})" if error.declared_by else ""
    return "unknown packages: " + ", ".join(one(name) for name in error.names) + where


def _unknown_detail(error: UnknownPackages) -> dict[str, Any]:
    detail: dict[str, Any] = {"unknown": list(error.names)}
    if error.declared_by:
        detail["image"] = error.declared_by
    if error.suggestions:
        detail["suggestions"] = error.suggestions
    return detail


def problem_text(problem: Problem) -> str:
    """One package's refusal, in nixpkgs' terms."""
    name, detail = problem.name, problem.detail
    if problem.kind == "removed":
        return f"{name}: {detail}"
    if problem.kind == "unfree":
        return (f"{name} has an unfree license ({detail or 'unfree'}), and this instance does not serve "
                f"unfree packages (its operator can allow them with NIXERY_ALLOW_UNFREE=true)")
    if problem.kind == "broken":
        return f"{name} is marked as broken in the package set"
    if problem.kind == "insecure":
        return f"{name} is marked as insecure in the package set (known issues: {detail})"
    if problem.kind == "unsupported":
        return f"{name} is not available on {detail} in the package set"
    if problem.kind == "not-a-package":
        return (f"{name} is not a package but {detail}"
                + (f": name one of its packages, {name}.NAME" if detail == "a set of packages" else ""))
    if problem.kind == "throws":
        return f"{name} fails to evaluate in the package set"
    return f"{name} cannot be evaluated: {detail}" if detail else f"{name} cannot be evaluated"


def _unavailable(error: UnavailablePackages) -> RegistryError:
    texts = [problem_text(p) for p in error.problems]
    detail: dict[str, Any] = {"packages": [{"name": p.name, "reason": p.kind, "detail": p.detail}
                                           for p in error.problems]}
    if error.unknown:
        texts.append(_unknown_text(error.unknown))
        detail.update(_unknown_detail(error.unknown))
    message = "; ".join(texts)
    if error.unknown is None and all(p.kind in _DENIED_KINDS for p in error.problems):
        return RegistryError(403, "DENIED", message, detail)
    return manifest_unknown(message, detail)


def _too_large(error: ImageTooLarge) -> RegistryError:
    return RegistryError(403, "DENIED", f"the image's packages take {format_size(error.size)} ({error.size} bytes), "
                         f"more than this instance's limit of {format_size(error.limit)} (NIXERY_MAX_IMAGE_SIZE)",
                         {"size": error.size, "max_image_size": error.limit})


def _stopping(error: ServerStopping) -> RegistryError:
    told = unavailable(str(error))
    told.headers["Retry-After"] = str(error.retry_after)
    return told


def _too_many(error: TooManyBuilds) -> RegistryError:
    told = RegistryError(429, "TOOMANYREQUESTS", f"this address already has {error.limit} new builds running; "
                         "retry when one has finished", {"client_builds": error.limit})
    told.headers["Retry-After"] = str(error.retry_after)
    return told


# Most specific first: `as_registry_error` takes the first type an exception is an instance of.
_TRANSLATIONS: dict[type[Exception], Callable[[Any], RegistryError]] = {
    RegistryError: lambda error: error,
    image.InvalidName: lambda error: RegistryError(400, "NAME_INVALID", str(error), {"name": error.name}),
    image.InvalidTag: lambda error: RegistryError(400, "TAG_INVALID", str(error), {"tag": error.tag}),
    image.InvalidDigest: lambda error: RegistryError(400, "DIGEST_INVALID", str(error), {"digest": error.digest}),
    image.TooManyComponents: lambda error: RegistryError(403, "DENIED", str(error), {
        "components": error.components, "max_packages": error.limit}),
    UnknownTag: lambda error: manifest_unknown(str(error), {"tag": error.tag}),
    RefusedTag: lambda error: RegistryError(403, "DENIED", str(error), {"tag": error.tag}),
    SourceUnavailable: lambda error: RegistryError(500, "UNKNOWN", str(error)),
    StorageError: lambda error: unavailable(f"storage failed: {error}"),
    ImageTooLarge: _too_large,
    TooManyBuilds: _too_many,
    ServerStopping: _stopping,
    UnknownPackages: lambda error: manifest_unknown(_unknown_text(error), _unknown_detail(error)),
    UnavailablePackages: _unavailable,
    UnsupportedSystem: lambda error: manifest_unknown(str(error), {"system": error.system}),
    BuildFailed: lambda error: RegistryError(BUILD_FAILED_STATUS, "UNKNOWN", error.reason),
    BuildTimedOut: lambda error: RegistryError(BUILD_FAILED_STATUS, "UNKNOWN", error.reason, {
        "limit": "NIX_TIMEOUT", "derivation": error.derivation}),
    EvaluationFailed: lambda error: (RegistryError(BUILD_FAILED_STATUS, "UNKNOWN", error.reason) if error.pinned
                                     else build_failed(error.reason)),
    InvalidDeclaration: lambda error: RegistryError(422, "MANIFEST_INVALID", str(error), {
        "image": error.image, "field": error.field}),
    EvaluationLimit: lambda error: RegistryError(403, "DENIED", error.reason, {"limit": error.variable}),
    Forbidden: lambda error: RegistryError(403, "DENIED", error.reason),
    NixError: lambda error: build_failed(error.reason),
}
_FALCON_CODES = {404: "NOT_FOUND", 405: "UNSUPPORTED"}


def as_registry_error(error: Exception) -> RegistryError:
    """What a client is told about `error`; anything unforeseen is a 500 naming only its type."""
    for kind, translate in _TRANSLATIONS.items():
        if isinstance(error, kind):
            return translate(error)
    if isinstance(error, falcon.HTTPError):
        return RegistryError(error.status_code, _FALCON_CODES.get(error.status_code, "UNKNOWN"),
                             error.title or "error")
    return internal_error(error)


def operator_action(error: Exception) -> str:
    """What the operator should do about a failure whose client is told only its 5xx status (the
    request's summary line in the log says it)."""
    if isinstance(error, NixError):
        return advice(error) or "Nix failed (the \"nix failed\" line before this one says why)"
    if isinstance(error, StorageError):
        return ("storage failed: check STORAGE_PATH's disk (space, permissions, read-only mount), or the "
                "bucket's reachability and the service account's access; /readyz says when it is back")
    if isinstance(error, SourceUnavailable):
        return ("the package source cannot be fetched: check NIXERY_PKGS_REPO's URL, its credentials "
                "(NIXERY_SSH_KEY, NIXERY_GIT_TOKEN) and known host keys; the next pull fetches again")
    return "a fault of Nixery itself: report it with the traceback logged as \"unhandled error\""


def _render(resp: falcon.Response, error: RegistryError) -> None:
    resp.status = falcon.code_to_http_status(error.status)
    resp.content_type = "application/json"
    resp.set_headers(error.headers)
    resp.data = error.body()


def _translated(req: falcon.Request, resp: falcon.Response, error: Exception, params: Any) -> None:
    _render(resp, as_registry_error(error))


def _http_error(req: falcon.Request, resp: falcon.Response, error: falcon.HTTPError, params: Any) -> None:
    """Falcon's own errors (a method a route lacks, a malformed header) in the registry's
    JSON shape under /v2/, as plain text elsewhere."""
    if req.path.startswith("/v2"):
        _render(resp, as_registry_error(error))
        return
    resp.status = error.status
    resp.content_type = "text/plain"
    resp.text = error.title or "error"


def _unexpected_error(req: falcon.Request, resp: falcon.Response, error: Exception, params: Any) -> None:
    log.exception("unhandled error", extra={"path": req.path})
    _render(resp, as_registry_error(error))


def _parked(req: falcon.Request, resp: falcon.Response, error: Parked, params: Any) -> None:
    """A parked request has no answer yet: re-raised, it leaves the app without one (and without
    the response middleware: it is neither logged nor counted) for the worker to park."""
    raise error


def register(app: falcon.App, challenge: Optional[Callable[[str, str], RegistryError]] = None) -> None:
    """One handler per exception type; Falcon picks the most specific for each exception.
    `challenge` is the auth middleware's 401 for a repository, which a refused build gets."""
    app.add_error_handler(Exception, _unexpected_error)
    app.add_error_handler(falcon.HTTPError, _http_error)
    app.add_error_handler(Parked, _parked)
    if challenge is not None:
        app.add_error_handler(BuildRefused, lambda req, resp, error, params: _render(
            resp, challenge(error.name, str(error))))
    for kind in _TRANSLATIONS:
        app.add_error_handler(kind, _translated)
