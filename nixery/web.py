"""The web page at `/`: what Nixery is, how to pull, which packages there are, builds, this instance's settings.

Someone who opens the registry's address in a browser should understand it in
a minute, and someone whose pull failed should find out why. The page is
rendered on the server from the templates in static/ (`page.html`, `index.html`,
`404.html`, and `fragments.html` for the pieces that depend on the instance),
with string.Template and every value passed through `html.escape` unless it
is a filled template itself, so it needs no JavaScript: the package search is a
form the server answers, and while builds run the page reloads itself (a meta
refresh) to show their progress. Its stylesheet and icon come from static/ as
well, and a Content-Security-Policy header keeps the page from loading anything
else. Paths outside `/v2/` that are not a page get an HTML
404, not the index, so a mistyped link does not look like a working one.
"""

from __future__ import annotations

import html
import json
import re
import string
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import falcon

from . import image
from .catalog import Catalog, DeclaredImages
from .config import AuthLevel, Config, SourceKind, redact_url
from .error_handlers import as_registry_error
from .errors import RegistryError
from .history import BuildHistory
from .progress import InProgress
from .search import PackageSearch, QueryError

STATIC_PACKAGE = "nixery.static"
CONTENT_TYPES = {".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; "
                               "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
BUILDS_SHOWN = 15
# Of each kind: build failures, and requests rejected (typos, mostly), which cannot push them off.
ERRORS_SHOWN = 10
# Seconds between reloads of the page while builds run.
REFRESH_SECONDS = 3
# What a Host header may look like: a name or IPv4 address, or a bracketed IPv6 address, with a port.
_HOST_RE = re.compile(r"([A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?")
PLACEHOLDER_HOST = "nixery.example.com"


def static_files() -> dict[str, bytes]:
    """Every file of static/: package data when installed, the top-level directory in a checkout."""
    try:
        root: Any = resources.files(STATIC_PACKAGE)
    except ModuleNotFoundError:
        root = Path(__file__).resolve().parent.parent / "static"
    return {item.name: item.read_bytes() for item in root.iterdir() if item.is_file()}


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def request_host(req: falcon.Request) -> str:
    """The host the client asked for (a proxy's X-Forwarded-Host first), so the example commands work
    as shown; a placeholder when the header does not look like a host."""
    forwarded = (req.get_header("X-Forwarded-Host") or "").split(",")[0].strip()
    host = forwarded or (req.get_header("Host") or "").strip()
    return host if _HOST_RE.fullmatch(host) else PLACEHOLDER_HOST


def human_bytes(size: float) -> str:
    if size < 1000:
        return f"{size:.0f} B"
    for unit in ("kB", "MB", "GB"):
        size /= 1000
        if size < 1000:
            break
    return f"{size:.1f} {unit}"


def human_seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


class Html(str):
    """Markup that is safe as it is: a filled template (every value it was given was escaped)."""


_FRAGMENT_RE = re.compile(r"^<!-- fragment ([a-z-]+) -->\n", re.MULTILINE)


def fragments(text: str) -> dict[str, string.Template]:
    """static/fragments.html's pieces by name."""
    parts = _FRAGMENT_RE.split(text)[1:]
    return {name: string.Template(body.rstrip("\n")) for name, body in zip(parts[::2], parts[1::2])}


class Templates:
    """static/'s HTML templates: the layout, the index and 404 bodies, and the fragments they are
    filled with. Every value is escaped unless it is `Html`, so no caller can forget to."""

    def __init__(self, files: dict[str, bytes]):
        self.layout = string.Template(files["page.html"].decode())
        self.index = string.Template(files["index.html"].decode())
        self.not_found = string.Template(files["404.html"].decode())
        self.fragments = fragments(files["fragments.html"].decode())

    @staticmethod
    def fill(template: string.Template, **values: object) -> Html:
        return Html(template.substitute({name: value if isinstance(value, Html) else esc(value)
                                         for name, value in values.items()}))

    def __call__(self, fragment: str, /, **values: object) -> Html:
        """The fragment named `fragment`, filled."""
        return self.fill(self.fragments[fragment], **values)

    def join(self, items: Iterable[str], separator: str = "\n") -> Html:
        """Fragments (already filled) one after the other."""
        return Html(separator.join(items))

    def codes(self, names: Iterable[str]) -> Html:
        """`a`, `b` and `c` as HTML."""
        items = [self("code", name=n) for n in names]
        return items[0] if len(items) == 1 else Html(", ".join(items[:-1]) + " and " + items[-1])

    def page(self, title: str, host: str, body: Html, head: Html = Html()) -> str:
        return self.fill(self.layout, title=title, host=host, body=body, head=head)


def _send_html(resp: falcon.Response, text: str, status: int = 200) -> None:
    resp.status = falcon.code_to_http_status(status)
    resp.content_type = "text/html; charset=utf-8"
    resp.set_headers(SECURITY_HEADERS)
    resp.cache_control = ["no-cache"]
    resp.data = text.encode()


class SourceText:
    """What the page says about tags, available packages and pinning, for this instance's package source."""

    def __init__(self, config: Config, t: Templates):
        self.config = config
        self.t = t
        self.argument = str(config.summary()["source"]["argument"])  # type: ignore[index]

    def description(self) -> Html:
        """With NIXERY_HIDE_DETAILS, a repository's URL and a directory's path are not named."""
        kind = self.config.source.kind.value
        hidden = "-hidden" if self.config.hide_details and self.config.source.kind is not SourceKind.CHANNEL else ""
        return self.t(f"source-{kind}{hidden}", argument=self.argument)

    def tags(self, host: str) -> Html:
        kind = self.config.source.kind
        if kind is SourceKind.CHANNEL:
            allowed = (self.t("tags-channel-allowed", channels=self.t.codes(self.config.channel_allow))
                       if self.config.channel_allow else Html())
            return self.t("tags-channel", description=self.description(), allowed=allowed, host=host)
        return self.t(f"tags-{kind.value}", description=self.description(), ttl=self.config.git.ttl)

    def packages(self) -> Html:
        if self.config.source.kind is SourceKind.CHANNEL:
            return self.t("packages-channel")
        return self.t("packages", description=self.description())

    def pinning(self, host: str) -> Html:
        return self.t(f"pin-{self.config.source.kind.value}", host=host)


class IndexPage:
    """`/`: the documentation, the package search, builds running and recent builds and errors, and the
    configuration that is safe to show. `declared` lists the package set's declared images (None: a
    source whose `latest` is not listed, a channel's nixpkgs tarball, which the page must not
    download); `package_search` searches its names (None: no search box)."""

    def __init__(self, config: Config, store: BuildHistory, templates: Templates, in_progress: InProgress,
                 declared: Optional[DeclaredImages] = None, package_search: Optional[PackageSearch] = None):
        self.config = config
        self.store = store
        self.t = templates
        self.in_progress = in_progress
        self.declared = declared
        self.package_search = package_search
        self.source = SourceText(config, templates)
        # Image names and build errors of a private instance are for those who may pull; a public
        # one may keep them to itself (NIXERY_HIDE_DETAILS).
        self.private = config.auth.level is AuthLevel.ALL
        self.hidden = self.private or config.hide_details

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        host = request_host(req)
        t = self.t
        running, head = Html(), Html()
        if self.hidden:
            which = "private" if self.private else "hidden"
            builds, errors = t(f"builds-{which}"), t(f"errors-{which}")
        else:
            now = self.in_progress.builds()
            if now:
                running, head = in_progress_table(t, now), t("refresh", seconds=REFRESH_SECONDS)
            builds = builds_table(t, self.store.builds()[:BUILDS_SHOWN])
            errors = errors_lists(t, self.store.errors())
        body = t.fill(
            t.index,
            host=host,
            running=running,
            search=self.search(req.get_param("q"), host),
            pull_note=t("plain-http", host=host) if req.forwarded_scheme == "http" else Html(),
            login=login_text(t, self.config, host),
            meta_rows=_meta_rows(t),
            declared=declared_section(t, self.declared.latest(), host) if self.declared and not self.private
            else Html(),
            optional=t.codes(image.OPTIONAL_PACKAGES),
            tags=self.source.tags(host),
            builds=builds,
            errors=errors,
            packages=self.source.packages(),
            budget=self.config.layer_budget,
            pin=self.source.pinning(host),
            config_rows=t("config-rows", source=self.source.description(), storage=self.config.storage_backend,
                          budget=self.config.layer_budget, timeout=self.config.nix_timeout,
                          platforms=(t.codes(self.config.platforms) if self.config.platforms
                                     else t("platforms-default")),
                          access=t(f"access-{self.config.auth.level.value}")),
        )
        _send_html(resp, t.page("Nixery: container images built on demand with Nix", host, body, head))

    on_head = on_get

    def search(self, query: Optional[str], host: str) -> Html:
        """The search form, and what it found for `query` (None: nothing asked yet)."""
        t = self.t
        if self.package_search is None:
            return Html()
        if self.private:
            return t("search-private")
        if query is None:
            return t("search", query="", results=Html())
        try:
            found = self.package_search.search(query)
        except Exception as e:  # the page still shows, with the reason the set cannot be searched
            reason = str(e) if isinstance(e, QueryError) else as_registry_error(e).message
            return t("search", query=query, results=t("search-error", reason=reason))
        if not found.names:
            results = t("search-none", query=found.query)
        else:
            shown = (t("search-shown", shown=len(found.names)) if found.total > len(found.names) else Html())
            results = t("search-results", count=found.total, query=found.query, shown=shown,
                        items=t.join(t("search-result", name=name) for name in found.names),
                        pull=self.pull_example(found.names[0], host))
        return t("search", query=query, results=results)

    def pull_example(self, name: str, host: str) -> Html:
        """How to pull the best match: image names are lower case, and a name starting with a digit
        finds its attribute's leading underscore (`7zip` is `_7zip`); nothing for a name that is no
        image name."""
        pulled = name.lower()
        pulled = pulled[1:] if pulled[:1] == "_" and pulled[1:2].isdigit() else pulled
        try:
            image.validate_name(f"shell/{pulled}")
        except image.InvalidName:
            return Html()
        return self.t("search-pull", host=host, name=pulled)


def login_text(t: Templates, config: Config, host: str) -> Html:
    """How to log in, for an instance that asks for it; what it is checked against, never with what."""
    level = config.auth.level
    if level is AuthLevel.OFF:
        return Html()
    who = t("login-who-build") if level is AuthLevel.BUILD else t("login-who-all")
    if level is AuthLevel.BUILD and config.source.kind is SourceKind.PATH:
        who = Html(who + t("login-path"))
    against = (t("login-token", realm=redact_url(config.auth.token.realm)) if config.auth.token
               else t("login-htpasswd"))
    anonymous = t("login-docker") if level is AuthLevel.BUILD and not config.auth.token else Html()
    return t("login", who=who, against=against, anonymous=anonymous, host=host)


def _meta_rows(t: Templates) -> Html:
    rows = [(name, t("meta-shell" if name == "shell" else "meta-packages", packages=t.codes(packages)))
            for name, packages in image.META_PACKAGES.items()]
    rows += [(name, t("meta-arch", system=arch.nix_system, arch=arch.docker_arch, default=image.AMD64.nix_system))
             for name, arch in image.ARCH_META.items()]
    rows.append((image.NONROOT, t("meta-nonroot")))
    return t.join(t("meta-row", name=name, meaning=meaning) for name, meaning in rows)


def declared_section(t: Templates, catalog: Catalog, host: str) -> Html:
    """The declared images of `latest`: each name with its packages, or why it cannot be pulled."""
    if catalog.error:
        body = t("declared-unreadable", reason=catalog.error)
    elif not catalog.images:
        body = t("declared-none")
    else:
        rows = [t("declared-row", name=i.name, packages=t.codes(i.packages), description=i.description)
                if not i.error else t("declared-invalid", name=i.name, reason=i.error) for i in catalog.images]
        body = t("declared-table", rows=t.join(rows), host=host)
    return t("declared", body=body, host=host)


def _when(t: Templates, item: dict[str, Any]) -> Html:
    stamp = str(item["time"])
    return t("when", stamp=stamp, shown=stamp.replace("T", " ").replace("Z", " UTC"))


def builds_table(t: Templates, builds: list[dict[str, Any]]) -> Html:
    if not builds:
        return t("builds-none")
    rows = []
    for b in builds:
        built = b["outcome"] == "built"
        rows.append(t("build", image=b["image"], tag=b["tag"], outcome=b["outcome"], took=human_seconds(b["duration"]),
                      layers=f'{b["layers"]} ({b["layers_built"]} new)' if built else "–",
                      size=human_bytes(b["size"]) if built else "–", when=_when(t, b)))
    return _table(t, "builds", ["image", "outcome", "#took", "#layers", "#size", "finished"], rows)


def _table(t: Templates, labelled_by: str, columns: list[str], rows: list[str]) -> Html:
    """A scrollable table of builds, labelled by the heading `labelled_by`; a column named
    `#name` holds numbers (right-aligned)."""
    heads = t.join((t("heading-number", name=name[1:]) if name.startswith("#") else t("heading", name=name)
                    for name in columns), "")
    return t("table", labelled_by=labelled_by, heads=heads, rows=t.join(rows))


def in_progress_table(t: Templates, builds: list[dict[str, Any]]) -> Html:
    """Builds running now, with their step, Nix's latest line and how long they have taken so far."""
    if not builds:
        return Html()
    rows = [t("running-build", image=b["image"], tag=b["tag"], step=b["step"], elapsed=human_seconds(b["elapsed"]),
              detail=t("running-detail", detail=b["detail"]) if b.get("detail") else Html())
            for b in builds]
    return t("running", seconds=REFRESH_SECONDS, table=_table(t, "running", ["image", "step", "#running for"], rows))


def errors_lists(t: Templates, errors: list[dict[str, Any]]) -> Html:
    """Build failures and rejected requests apart, ERRORS_SHOWN of each: a scanner's or a user's
    typos must not push a real failure off the page."""
    failed = [e for e in errors if e["outcome"] != "rejected"][:ERRORS_SHOWN]
    rejected = [e for e in errors if e["outcome"] == "rejected"][:ERRORS_SHOWN]
    return t("errors", failed=errors_list(t, failed, "failures"), rejected=errors_list(t, rejected, "rejected"))


def errors_list(t: Templates, errors: list[dict[str, Any]], kind: str) -> Html:
    if not errors:
        return t(f"errors-none-{kind}")
    return t("errors-list", kind=kind, items=t.join(
        t("error", image=e["image"], tag=e["tag"], when=_when(t, e), reason=e["reason"]) for e in errors))


def _send_json(resp: falcon.Response, refusal: str, body: Callable[[], object]) -> None:
    """A JSON view for scripts, never cached; 403 with `refusal` when it is not shown here."""
    resp.content_type = "application/json"
    resp.cache_control = ["no-cache"]
    if refusal:
        resp.status = falcon.HTTP_403
        resp.data = json.dumps({"error": refusal}).encode()
        return
    resp.data = json.dumps(body()).encode()


class BuildsJson:
    """`/builds.json`: builds in progress (oldest first), then the recent builds and errors for scripts,
    newest first (403 on a private instance, or one that hides its details)."""

    def __init__(self, store: BuildHistory, private: bool, in_progress: InProgress):
        self.store = store
        self.private = private
        self.in_progress = in_progress

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        _send_json(resp, "this instance does not list its builds" if self.private else "", lambda: {
            "in_progress": self.in_progress.builds(), "builds": self.store.builds(), "errors": self.store.errors()})

    on_head = on_get


class DeclaredJson:
    """`/declared.json`: the declared images of `latest` for scripts (403 on a private instance).
    {"revision": commit or null, "images": [{"name", "packages", "description"} or {"name", "error"}],
    "error": why they cannot be read now, if so}."""

    def __init__(self, declared: Optional[DeclaredImages], private: bool):
        self.declared = declared
        self.private = private

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        _send_json(resp, "this instance does not list its images" if self.private else "", self._listing)

    def _listing(self) -> dict[str, Any]:
        catalog = self.declared.latest() if self.declared else Catalog(None)
        body: dict[str, Any] = {"revision": catalog.revision, "images": [i.as_json() for i in catalog.images]}
        if catalog.error:
            body["error"] = catalog.error
        return body

    on_head = on_get


class PackagesJson:
    """`/packages.json?q=WORD`: the names of the package set that contain WORD (all of them without
    `q`), for scripts and the curious: `{"query", "packages": [{"name"}], "total", "images"}`, at most
    RESULTS_MAX packages; `images` holds the declared images of `latest` whose name contains WORD
    (a declared name wins over a package's, so a search must show it). 403 on a private instance,
    whose set may be private too."""

    def __init__(self, package_search: PackageSearch, declared: Optional[DeclaredImages], private: bool):
        self.package_search = package_search
        self.declared = declared
        self.private = private

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        _send_json(resp, "this instance does not list its packages" if self.private else "",
                   lambda: self.found(req.get_param("q") or ""))

    on_head = on_get

    def found(self, query: str) -> dict[str, object]:
        try:
            found = self.package_search.search(query)
        except QueryError as e:
            raise RegistryError(400, "QUERY_INVALID", str(e)) from None
        catalog = self.declared.latest() if self.declared else Catalog(None)
        word = found.query.lower()
        images = [i.as_json() for i in catalog.images if not i.error and word in i.name]
        return {"query": found.query, "packages": [{"name": name} for name in found.names], "total": found.total,
                "images": images}


class NotFound:
    """The sink for every path outside `/v2/` that no route takes: an HTML 404 page."""

    def __init__(self, templates: Templates):
        self.templates = templates

    def __call__(self, req: falcon.Request, resp: falcon.Response, **_: str) -> None:
        host = request_host(req)
        body = self.templates.fill(self.templates.not_found, path=req.path)
        _send_html(resp, self.templates.page("Not found: Nixery", host, body), status=404)


class StaticFiles:
    """`/static/{file}`: the stylesheet and icon, from memory; anything else is the 404 page."""

    def __init__(self, files: dict[str, bytes], not_found: NotFound):
        self.files = {name: data for name, data in files.items() if Path(name).suffix in CONTENT_TYPES}
        self.not_found = not_found

    def on_get(self, req: falcon.Request, resp: falcon.Response, file: str) -> None:
        data = self.files.get(file)
        if data is None:
            self.not_found(req, resp)
            return
        resp.content_type = CONTENT_TYPES[Path(file).suffix]
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.cache_control = ["public", "max-age=3600"]
        resp.data = data

    on_head = on_get


def add_routes(app: falcon.App, config: Config, store: BuildHistory, in_progress: InProgress | None = None,
               declared: Optional[DeclaredImages] = None, package_search: Optional[PackageSearch] = None) -> None:
    """The page, its files, the JSON views (`/packages.json` given a `package_search`), and the 404 page for
    every other path outside `/v2/`."""
    in_progress = in_progress or InProgress(config.state)
    files = static_files()
    templates = Templates(files)
    not_found = NotFound(templates)
    app.add_route("/", IndexPage(config, store, templates, in_progress, declared, package_search))
    app.add_route("/declared.json", DeclaredJson(declared, config.auth.level is AuthLevel.ALL))
    app.add_route("/static/{file}", StaticFiles(files, not_found))
    app.add_route("/builds.json", BuildsJson(store, config.auth.level is AuthLevel.ALL or config.hide_details,
                                             in_progress))
    if package_search is not None:
        app.add_route("/packages.json", PackagesJson(package_search, declared, config.auth.level is AuthLevel.ALL))
    app.add_sink(not_found, prefix=re.compile(r"/(?!v2/)"))
