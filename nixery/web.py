"""The web page at `/`: what Nixery is, how to pull, recent builds, this instance's settings.

Someone who opens the registry's address in a browser should understand it in
a minute, and someone whose pull failed should find out why. The page is
rendered on the server from the templates in static/, with every value passed
through `html.escape`, so it needs no JavaScript; its stylesheet and icon come
from static/ as well, and a Content-Security-Policy header keeps the page from
loading anything else. Paths outside `/v2/` that are not a page get an HTML
404, not the index, so a mistyped link does not look like a working one.
"""

from __future__ import annotations

import html
import json
import re
import string
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import falcon

from . import image
from .config import AuthLevel, Config, SourceKind, redact_url
from .history import BuildHistory
from .progress import InProgress

STATIC_PACKAGE = "nixery.static"
CONTENT_TYPES = {".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
BUILDS_SHOWN = 15
ERRORS_SHOWN = 10
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


def _codes(names: Iterable[str]) -> str:
    """`a`, `b` and `c` as HTML."""
    items = [f"<code>{esc(n)}</code>" for n in names]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class Templates:
    """static/'s HTML templates; `page` wraps a body in the shared layout."""

    def __init__(self, files: dict[str, bytes]):
        self.layout = string.Template(files["page.html"].decode())
        self.index = string.Template(files["index.html"].decode())
        self.not_found = string.Template(files["404.html"].decode())

    def page(self, title: str, host: str, body: str) -> str:
        return self.layout.substitute(title=esc(title), host=esc(host), body=body)


def _send_html(resp: falcon.Response, text: str, status: int = 200) -> None:
    resp.status = falcon.code_to_http_status(status)
    resp.content_type = "text/html; charset=utf-8"
    resp.set_headers(SECURITY_HEADERS)
    resp.cache_control = ["no-cache"]
    resp.data = text.encode()


class SourceText:
    """What the page says about tags, available packages and pinning, for this instance's package source."""

    def __init__(self, config: Config):
        self.config = config
        self.argument = str(config.summary()["source"]["argument"])  # type: ignore[index]

    def description(self) -> str:
        """With NIXERY_HIDE_DETAILS, a repository's URL and a directory's path are not named."""
        kind = self.config.source.kind
        hidden = self.config.hide_details
        if kind is SourceKind.CHANNEL:
            return f"the nixpkgs channel <code>{esc(self.argument)}</code>"
        if kind is SourceKind.GIT:
            return ("the package set in a git repository" if hidden
                    else f"the package set in the git repository <code>{esc(self.argument)}</code>")
        return ("a package set in a directory on the server" if hidden
                else f"the package set in the directory <code>{esc(self.argument)}</code> on the server")

    def tags(self, host: str) -> str:
        kind = self.config.source.kind
        if kind is SourceKind.CHANNEL:
            allowed = (f" Tags may also name the channels {_codes(self.config.channel_allow)}."
                       if self.config.channel_allow else "")
            return (f"<p><code>latest</code> builds from {self.description()} as it is now; the channel moves, "
                    f"so <code>latest</code> does too. A tag that is a 40-character nixpkgs commit builds from "
                    f"that commit: the image is pinned, and once built it is served from storage without "
                    f"running Nix again.{allowed}</p>"
                    f'<pre class="command"><code>docker pull {esc(host)}/shell/git:'
                    f"&lt;nixpkgs commit&gt;</code></pre>")
        if kind is SourceKind.GIT:
            return (f"<p>Packages come from {self.description()}. <code>latest</code> builds its default branch; "
                    f"any other tag names a branch or tag of the repository, or a full 40-character commit. "
                    f"An image of a commit is pinned: once built it is served from storage without running "
                    f"Nix again. Branches are fetched again at most every {self.config.git_ttl} seconds.</p>")
        return (f"<p>Packages come from {self.description()}, which has no revisions: this instance serves "
                f"only the tag <code>latest</code>, built from the directory as it is now.</p>")

    def packages(self) -> str:
        if self.config.source.kind is SourceKind.CHANNEL:
            return ("Every attribute of nixpkgs, in the revision the tag picks: the names that "
                    '<a href="https://search.nixos.org/packages">search.nixos.org</a> lists.')
        return f"Every attribute of {self.description()}."

    def pinning(self, host: str) -> str:
        kind = self.config.source.kind
        if kind is SourceKind.CHANNEL:
            return ("Yes: use a nixpkgs commit as the tag. The same commit always gives the same packages, "
                    "so the image is cached and every pull gets the same digest.")
        if kind is SourceKind.GIT:
            return ("Yes: use a commit of the package repository as the tag. The same commit always gives "
                    "the same packages, so the image is cached and every pull gets the same digest.")
        return ("Not by tag on this instance, as its package set is a plain directory. Pull by digest "
                f"instead (<code>docker pull {esc(host)}/shell/git@sha256:…</code>): a manifest once "
                "built stays available by its digest.")


class IndexPage:
    """`/`: the documentation, recent builds and errors, and the configuration that is safe to show."""

    def __init__(self, config: Config, store: BuildHistory, templates: Templates, in_progress: InProgress):
        self.config = config
        self.store = store
        self.templates = templates
        self.in_progress = in_progress
        self.source = SourceText(config)
        # Image names and build errors of a private instance are for those who may pull; a public
        # one may keep them to itself (NIXERY_HIDE_DETAILS).
        self.private = config.auth.level is AuthLevel.ALL
        self.hidden = self.private or config.hide_details

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        host = request_host(req)
        body = self.templates.index.substitute(
            host=esc(host),
            pull_note=self._pull_note(req, host),
            login=login_text(self.config, host),
            meta_rows=_meta_rows(),
            optional=_codes(image.OPTIONAL_PACKAGES),
            tags=self.source.tags(host),
            builds=(PRIVATE_BUILDS if self.private else HIDDEN_BUILDS if self.hidden
                    else in_progress_table(self.in_progress.builds()) + builds_table(self.store.builds()[:BUILDS_SHOWN])),
            errors=PRIVATE_ERRORS if self.private else HIDDEN_ERRORS if self.hidden
            else errors_list(self.store.errors()[:ERRORS_SHOWN]),
            packages=self.source.packages(),
            budget=esc(self.config.layer_budget),
            pin=self.source.pinning(host),
            config_rows=self._config_rows(),
        )
        _send_html(resp, self.templates.page("Nixery: container images built on demand with Nix", host, body))

    on_head = on_get

    @staticmethod
    def _pull_note(req: falcon.Request, host: str) -> str:
        """Plain HTTP needs a word of client configuration, or the first pull fails with a TLS error."""
        if req.forwarded_scheme != "http":
            return ""
        return (f'<p class="note">This address speaks plain HTTP. Docker pulls from it once '
                f'<code>{esc(host)}</code> is listed under <code>insecure-registries</code> in '
                f"<code>/etc/docker/daemon.json</code> (localhost needs nothing); skopeo and podman want "
                f"<code>--tls-verify=false</code>.</p>")

    def _config_rows(self) -> str:
        rows = [
            ("Package source", self.source.description()),
            ("Storage", f"<code>{esc(self.config.storage_backend)}</code>"),
            ("Layer budget", f"{esc(self.config.layer_budget)} layers per image, plus the root layer"),
            ("Platforms", _codes(self.config.platforms) if self.config.platforms
             else "the platforms this instance's Nix builds for"),
            ("Build timeout", f"{esc(self.config.nix_timeout)} seconds per Nix step"),
            ("Access", ACCESS[self.config.auth.level]),
        ]
        return "\n".join(f"    <dt>{name}</dt><dd>{value}</dd>" for name, value in rows)


PRIVATE_BUILDS = ('<p class="empty">This instance is private (every pull needs a login), so its recent '
                  "builds and errors are not listed here.</p>")
PRIVATE_ERRORS = '<p class="empty">Not listed on a private instance.</p>'
HIDDEN_BUILDS = '<p class="empty">This instance does not list its recent builds and errors.</p>'
HIDDEN_ERRORS = '<p class="empty">Not listed on this instance.</p>'
ACCESS = {
    AuthLevel.OFF: "open: anyone who can reach this instance pulls and builds images",
    AuthLevel.BUILD: "images already built are open to all; building a new image needs a login",
    AuthLevel.ALL: "private: every pull needs a login",
}


def login_text(config: Config, host: str) -> str:
    """How to log in, for an instance that asks for it; what it is checked against, never with what."""
    level = config.auth.level
    if level is AuthLevel.OFF:
        return ""
    who = ("Images that are already built can be pulled without logging in; building a new image needs "
           "a login." if level is AuthLevel.BUILD else "Every pull needs a login.")
    if level is AuthLevel.BUILD and config.source.kind is SourceKind.PATH:
        who += (" Here a pull by tag always runs Nix (a directory has no revisions to pin), so without a "
                "login, images are pulled by digest.")
    if config.auth.token:
        against = (f"Logins go through the token service at <code>{esc(redact_url(config.auth.token.realm))}"
                   f"</code>: use your account there.")
    else:
        against = "Ask this instance's operator for a user name and password."
    anonymous = (" Docker asks for a login before any pull from an instance that challenges it, so Docker "
                 "users log in even for built images; skopeo, podman and Kubernetes pull them without."
                 if level is AuthLevel.BUILD and not config.auth.token else "")
    return (f'<p class="note">{who} {against}{anonymous}</p>'
            f'<pre class="command"><code>docker login {esc(host)}</code></pre>'
            f"<p>skopeo and podman: <code>skopeo login {esc(host)}</code>, or <code>--creds USER:PASSWORD</code> "
            f"on one command. Kubernetes: an image pull secret of type "
            f"<code>kubernetes.io/dockerconfigjson</code> for <code>{esc(host)}</code>.</p>")


def _meta_rows() -> str:
    rows = [(name, f"the packages {_codes(packages)}" + (", and the image starts bash" if name == "shell" else ""))
            for name, packages in image.META_PACKAGES.items()]
    rows += [(name, (f"build for <code>{esc(arch.nix_system)}</code> ({esc(arch.docker_arch)}) instead of "
                     f"<code>{esc(image.AMD64.nix_system)}</code>"))
             for name, arch in image.ARCH_META.items()]
    rows.append((image.NONROOT, "run as the unprivileged user <code>nonroot</code> (uid 65532), whose home "
                                "<code>/home/nonroot</code> and <code>/tmp</code> are writable"))
    return "\n".join(f"      <tr><td><code>{esc(name)}</code></td><td>{meaning}</td></tr>" for name, meaning in rows)


def _when(item: dict[str, Any]) -> str:
    stamp = str(item["time"])
    return f'<time class="when" datetime="{esc(stamp)}">{esc(stamp.replace("T", " ").replace("Z", " UTC"))}</time>'


def builds_table(builds: list[dict[str, Any]]) -> str:
    if not builds:
        return '<p class="empty">No images have been built since this instance started keeping track.</p>'
    rows = []
    for b in builds:
        built = b["outcome"] == "built"
        layers = f'{b["layers"]} ({b["layers_built"]} new)' if built else "–"
        # data-label names a cell where narrow screens stack each row instead of showing the header.
        rows.append(f'      <tr><td class="image"><code>{esc(b["image"])}:{esc(b["tag"])}</code></td>'
                    f'<td><span class="badge {esc(b["outcome"])}">{esc(b["outcome"])}</span></td>'
                    f'<td class="num" data-label="took">{human_seconds(b["duration"])}</td>'
                    f'<td class="num" data-label="layers">{esc(layers)}</td>'
                    f'<td class="num" data-label="size">{human_bytes(b["size"]) if built else "–"}</td>'
                    f'<td data-label="finished">{_when(b)}</td></tr>')
    return _table("builds", ["image", "outcome", "#took", "#layers", "#size", "finished"], rows)


def _table(labelled_by: str, columns: list[str], rows: list[str]) -> str:
    """A scrollable table of builds, labelled by the heading `labelled_by`; a column named
    `#name` holds numbers (right-aligned)."""
    heads = "".join(f'<th scope="col" class="num">{name[1:]}</th>' if name.startswith("#")
                    else f'<th scope="col">{name}</th>' for name in columns)
    return (f'<div class="scroll" role="region" aria-labelledby="{labelled_by}" tabindex="0">\n'
            '<table class="builds">\n'
            f'    <thead><tr>{heads}</tr></thead>\n'
            f'    <tbody>\n{chr(10).join(rows)}\n    </tbody>\n</table>\n</div>')


def in_progress_table(builds: list[dict[str, Any]]) -> str:
    """Builds running now, with their step and how long they have taken so far."""
    if not builds:
        return ""
    rows = []
    for b in builds:
        detail = f'<span class="reason">{esc(b["detail"])}</span>' if b.get("detail") else ""
        rows.append(f'      <tr><td class="image"><code>{esc(b["image"])}:{esc(b["tag"])}</code></td>'
                    f'<td data-label="step"><span class="badge running">{esc(b["step"])}</span>{detail}</td>'
                    f'<td class="num" data-label="running for">{human_seconds(b["elapsed"])}</td></tr>')
    return '<h3 id="running">Building now</h3>\n' + _table("running", ["image", "step", "#running for"], rows) + "\n"


def errors_list(errors: list[dict[str, Any]]) -> str:
    if not errors:
        return '<p class="empty">No failed builds recently.</p>'
    items = [f'  <li><code>{esc(e["image"])}:{esc(e["tag"])}</code> {_when(e)}'
             f'<span class="reason">{esc(e["reason"])}</span></li>' for e in errors]
    return '<ol class="errors">\n' + "\n".join(items) + "\n</ol>"


class BuildsJson:
    """`/builds.json`: builds in progress (oldest first), then the recent builds and errors for scripts,
    newest first (403 on a private instance, or one that hides its details)."""

    def __init__(self, store: BuildHistory, private: bool, in_progress: InProgress):
        self.store = store
        self.private = private
        self.in_progress = in_progress

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = "application/json"
        resp.cache_control = ["no-cache"]
        if self.private:
            resp.status = falcon.HTTP_403
            resp.data = json.dumps({"error": "this instance does not list its builds"}).encode()
            return
        resp.data = json.dumps({"in_progress": self.in_progress.builds(), "builds": self.store.builds(),
                                "errors": self.store.errors()}).encode()

    on_head = on_get


class NotFound:
    """The sink for every path outside `/v2/` that no route takes: an HTML 404 page."""

    def __init__(self, templates: Templates):
        self.templates = templates

    def __call__(self, req: falcon.Request, resp: falcon.Response, **_: str) -> None:
        host = request_host(req)
        body = self.templates.not_found.substitute(path=esc(req.path))
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


def add_routes(app: falcon.App, config: Config, store: BuildHistory, in_progress: InProgress | None = None) -> None:
    """The page, its files, the JSON view, and the 404 page for every other path outside `/v2/`."""
    in_progress = in_progress or InProgress(config.state)
    files = static_files()
    templates = Templates(files)
    not_found = NotFound(templates)
    app.add_route("/", IndexPage(config, store, templates, in_progress))
    app.add_route("/static/{file}", StaticFiles(files, not_found))
    app.add_route("/builds.json", BuildsJson(store, config.auth.level is AuthLevel.ALL or config.hide_details,
                                             in_progress))
    app.add_sink(not_found, prefix=re.compile(r"/(?!v2/)"))
