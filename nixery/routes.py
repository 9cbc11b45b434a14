"""The distribution spec's path shapes below `/v2/`, and a Falcon router that knows them.

A repository name holds slashes, which a field of a Falcon URI template
cannot, so each shape is a regular expression whose named groups Falcon passes
to the responders as they are, and whose template becomes `req.uri_template`:
the label the metrics count requests by (a name never becomes a label) and
what the auth middleware asks which routes name a repository.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional

import falcon
from falcon.routing import CompiledRouter


@dataclasses.dataclass(frozen=True)
class Shape:
    template: str
    pattern: re.Pattern[str]


MANIFESTS = Shape("/v2/{name}/manifests/{reference}", re.compile(r"/v2/(?P<name>.+)/manifests/(?P<reference>[^/]+)"))
BLOBS = Shape("/v2/{name}/blobs/{digest}", re.compile(r"/v2/(?P<name>.+)/blobs/(?P<digest>[^/]+)"))
UPLOADS = Shape("/v2/{name}/blobs/uploads/{session}", re.compile(r"/v2/(?P<name>.+)/blobs/uploads/(?P<session>.+)"))
REFERRERS = Shape("/v2/{name}/referrers/{digest}", re.compile(r"/v2/(?P<name>.+)/referrers/(?P<digest>[^/]+)"))
TAGS = Shape("/v2/{name}/tags/list", re.compile(r"/v2/(?P<name>.+)/tags/list"))
OTHER = Shape("/v2/{other}", re.compile(r"/v2/(?P<other>.+)"))
# The routes whose `name` is the repository a client must be allowed to pull (and a challenge's scope).
PULLS = frozenset({MANIFESTS.template, BLOBS.template})

Responder = Callable[..., None]


class RegistryRouter(CompiledRouter):
    """Falcon's router for templates, then the shapes in the order they were added (the first that
    matches the whole path wins)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[Shape, object, dict[str, Responder]]] = []

    def add_shape(self, shape: Shape, resource: object, otherwise: Responder) -> None:
        """`resource`'s `on_get`, `on_head`, ... answer their methods; `otherwise` every other."""
        methods = {method: getattr(resource, f"on_{method.lower()}", otherwise) for method in falcon.COMBINED_METHODS}
        self.shapes.append((shape, resource, methods))

    def find(self, uri: str, req: Optional[falcon.Request] = None) -> Optional[tuple[Any, ...]]:
        found = super().find(uri, req)
        if found is not None:
            return found
        for shape, resource, methods in self.shapes:
            match = shape.pattern.fullmatch(uri)
            if match:
                return resource, methods, match.groupdict(), shape.template
        return None
