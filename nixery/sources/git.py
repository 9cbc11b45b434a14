"""Git package sources: a bare mirror kept with pygit2, tags resolved to commits.

Gunicorn's workers share nothing in memory, so everything that must hold
across them lives on disk: the mirror itself, a file lock so that one fetch
runs at a time, and a row of the state database (nixery/state.py) saying when
the last fetch ended and how.
A request that queued behind a fetch uses that fetch's outcome instead of
starting another, however many requests arrive at once.

Nix is handed a checkout of exactly the resolved commit, exported once into a
directory named by the commit, never a branch that may move under a build.
The repository URL is fetched through an anonymous remote, so a token in it is
never written to the mirror's config; it is redacted from every message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

import pygit2
from pygit2.enums import CheckoutStrategy, CredentialType, FetchPrune

from ..config import redact_url
from ..image import TAG_RE
from ..locks import file_lock
from ..nix import SourceArgs
from ..state import Store
from . import COMMIT_RE, Resolved, SourceUnavailable, UnknownTag

log = logging.getLogger(__name__)

# Where the remote's HEAD (its default branch) lands in the mirror: `latest`.
DEFAULT_REF = "refs/nixery/default"
REFSPECS = ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*", f"+HEAD:{DEFAULT_REF}"]
# Checkouts nobody built from for this long are removed when a new one is exported.
CHECKOUT_MAX_AGE = 7 * 24 * 3600
# A remote that does not answer must not hold the fetch lock (and every request) forever.
CONNECT_TIMEOUT_MS = 30_000
IO_TIMEOUT_MS = 120_000
# Unknown names fetch at most this often (or every NIXERY_GIT_TTL, if shorter).
MISS_FETCH_FLOOR = 10.0
SSH_KEY_FILES = ("id_ed25519", "id_ecdsa", "id_rsa")
TOKEN_USERNAME = "x-access-token"


@dataclasses.dataclass(frozen=True)
class GitSettings:
    """What a git source needs of the configuration, and where it may keep its mirrors and locks."""

    url: str
    ttl: int
    ssh_key: Optional[Path]
    token: Optional[str] = dataclasses.field(repr=False)
    ssh_dir: Path  # where the default keys are looked for
    ssh_agent: bool  # whether SSH_AUTH_SOCK names an agent (libgit2 reads it itself)
    mirrors_dir: Path
    lock_dir: Path
    store: Path  # the state database, which keeps each repository's last fetch


@dataclasses.dataclass(frozen=True)
class _FetchState:
    """The last fetch attempt: when it ended and, if it failed, the client's one-line reason."""

    ended: float
    error: Optional[str]


class _Credentials(pygit2.RemoteCallbacks):
    """Offers credentials the way git users expect, each at most once, then gives up.

    ssh: NIXERY_SSH_KEY if set; otherwise the SSH agent, then ~/.ssh's default keys
    (the configuration says where ~/.ssh is and whether an agent runs).
    https: NIXERY_GIT_TOKEN (a token embedded in the URL is used by libgit2 itself).
    libgit2 asks again after every refusal, so without the "at most once" a
    wrong key would loop forever.
    """

    def __init__(self, ssh_key: Optional[Path], token: Optional[str], ssh_dir: Path, ssh_agent: bool):
        super().__init__()
        self.ssh_key = ssh_key
        self.token = token
        self.ssh_dir = ssh_dir
        self.ssh_agent = ssh_agent
        self.offered: set[str] = set()

    def credentials(self, url: str, username_from_url: Optional[str],
                    allowed_types: CredentialType) -> pygit2.Username | pygit2.Keypair | pygit2.UserPass:
        user = username_from_url or "git"
        if allowed_types & CredentialType.USERNAME:
            return pygit2.Username(user)  # asked once per connection, before any key
        for name, credential in self._candidates(user, username_from_url, allowed_types):
            if name not in self.offered:
                self.offered.add(name)
                return credential
        raise pygit2.GitError("authentication refused" if self.offered
                              else "authentication required, and no credentials are configured")

    def certificate_check(self, certificate: None, valid: bool, host: bytes) -> bool:
        """Connects only to a host libgit2 verified: TLS as usual, ssh by ~/.ssh/known_hosts.

        libgit2 (libssh2) checks the ssh host key against $HOME/.ssh/known_hosts
        (plain, `[host]:port` or hashed entries) and passes the outcome as
        `valid`, but pygit2's default callback accepts every ssh host key,
        unknown or mismatched, which would let a man in the middle serve a
        forged package set. False fails the fetch with "invalid or unknown
        remote ssh hostkey".
        """
        return valid

    def _candidates(self, ssh_user: str, url_user: Optional[str],
                    allowed: CredentialType) -> Iterator[tuple[str, pygit2.Keypair | pygit2.UserPass]]:
        if allowed & CredentialType.SSH_KEY:
            yield from self._ssh_keys(ssh_user)
        if allowed & CredentialType.USERPASS_PLAINTEXT and self.token:
            yield "token", pygit2.UserPass(url_user or TOKEN_USERNAME, self.token)

    def _ssh_keys(self, user: str) -> Iterator[tuple[str, pygit2.Keypair]]:
        if self.ssh_key:
            yield "key", _keypair(user, self.ssh_key)
            return
        if self.ssh_agent:
            yield "agent", pygit2.KeypairFromAgent(user)
        for name in SSH_KEY_FILES:
            path = self.ssh_dir / name
            if path.is_file():
                yield name, _keypair(user, path)


def _keypair(user: str, private: Path) -> pygit2.Keypair:
    """libssh2 derives the public key when no `.pub` file sits next to the private one."""
    public = private.with_name(private.name + ".pub")
    return pygit2.Keypair(user, str(public) if public.is_file() else None, str(private), "")


class GitSource:
    """NIXERY_PKGS_REPO: tags are git references, resolved to commits, which pin the cache."""

    def __init__(self, settings: GitSettings):
        self.url = settings.url
        self.name = redact_url(self.url)
        self.ttl = settings.ttl
        self.token = settings.token
        self.settings = settings
        root = settings.mirrors_dir / hashlib.sha256(self.name.encode()).hexdigest()[:16]
        self.mirror = root / "mirror.git"
        self.checkouts = root / "checkouts"
        self.store = Store.at(settings.store)
        self.lock_dir = settings.lock_dir
        pygit2.settings.server_connect_timeout = CONNECT_TIMEOUT_MS
        pygit2.settings.server_timeout = IO_TIMEOUT_MS

    def tags(self) -> list[str]:
        """`latest` and the repository's branches and tags whose names are valid image tags
        (fetched first when the branch data is stale, as for a pull)."""
        if self._stale():
            self._fetch(since=time.time())
        names = {"latest"}
        if (self.mirror / "HEAD").exists():
            repo = pygit2.Repository(str(self.mirror))
            for ref in repo.references:
                for prefix in ("refs/heads/", "refs/tags/"):
                    if ref.startswith(prefix) and TAG_RE.fullmatch(ref[len(prefix):]):
                        names.add(ref[len(prefix):])
        return sorted(names)

    def resolve(self, tag: str) -> Resolved:
        commit = self._commit(tag)
        return Resolved(f"git:{self.name}:{commit}", lambda: self._checkout(commit), self.name, commit)

    def _commit(self, tag: str) -> str:
        """The commit `tag` names, fetching when the branch data is stale or the tag unknown."""
        if not pygit2.reference_is_valid_name(f"refs/tags/{tag}"):
            raise self._unknown(tag)  # no fetch can ever make it a reference
        fetched = False
        # A commit never changes; only names (latest, tags, branches) can go stale.
        if not COMMIT_RE.fullmatch(tag) and self._stale():
            self._fetch(since=time.time())
            fetched = True
        commit = self._lookup(tag)
        if commit is None and not fetched:
            # A name the mirror lacks may be new upstream, but a client asking for random tags
            # must not make us hammer the remote: a fetch this recent is taken as the answer.
            self._fetch(since=time.time() - min(self.ttl, MISS_FETCH_FLOOR))
            commit = self._lookup(tag)
        if commit is None:
            raise self._unknown(tag)
        return commit

    def _unknown(self, tag: str) -> UnknownTag:
        return UnknownTag(tag, f"tag {tag} names no commit, tag or branch of {self.name}")

    def _lookup(self, tag: str) -> Optional[str]:
        """latest is the remote's default branch, 40 hex a commit, anything else a tag then a branch."""
        if not (self.mirror / "HEAD").exists():
            return None
        repo = pygit2.Repository(str(self.mirror))
        if COMMIT_RE.fullmatch(tag):
            obj = repo.get(tag)
            return str(obj.id) if isinstance(obj, pygit2.Commit) else None
        names = [DEFAULT_REF] if tag == "latest" else [f"refs/tags/{tag}", f"refs/heads/{tag}"]
        for name in names:
            if name in repo.references:
                target = repo.references[name].peel()
                if isinstance(target, pygit2.Commit):
                    return str(target.id)
        return None

    def _read_state(self) -> Optional[_FetchState]:
        """The last fetch into the mirror (none when the mirror is gone, whatever the store says)."""
        rows = self.store.query("SELECT ended, error FROM git_fetches WHERE source = ?", (self.name,))
        return _FetchState(*rows[0]) if rows and (self.mirror / "HEAD").exists() else None

    def _stale(self) -> bool:
        state = self._read_state()
        return state is None or state.error is not None or time.time() - state.ended >= self.ttl

    def _fetch(self, since: float) -> None:
        """Fetches unless a fetch ended after `since` (the caller queued behind it): then its outcome stands."""
        with file_lock(self.lock_dir, f"git-fetch {self.name}"):
            state = self._read_state()
            if state is None or state.ended < since:
                state = self._fetch_now()
            if state.error is not None:
                raise SourceUnavailable(state.error)

    def _fetch_now(self) -> _FetchState:
        start = time.monotonic()
        try:
            self._init_mirror()
            repo = pygit2.Repository(str(self.mirror))
            repo.remotes.create_anonymous(self.url).fetch(
                REFSPECS, callbacks=_Credentials(self.settings.ssh_key, self.token, self.settings.ssh_dir,
                                                 self.settings.ssh_agent), prune=FetchPrune.PRUNE)
            state = _FetchState(time.time(), None)
            log.info("fetched repository", extra={"source": self.name,
                                                  "duration": round(time.monotonic() - start, 3)})
        except (pygit2.GitError, OSError) as e:
            full = self._redact(str(e))
            first = (full.strip().splitlines() or [type(e).__name__])[0]
            state = _FetchState(time.time(), f"cannot fetch repository {self.name}: {first}")
            log.error("git fetch failed", extra={"source": self.name, "reason": full})
        self._write_state(state)
        return state

    def _redact(self, text: str) -> str:
        text = redact_url(text.replace(self.url, self.name))
        return text.replace(self.token, "***") if self.token else text

    def _init_mirror(self) -> None:
        """Creates the bare mirror whole (under the fetch lock), so nobody opens half of one."""
        if (self.mirror / "HEAD").exists():
            return
        self.mirror.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.mirror.parent, prefix=".mirror-"))
        pygit2.init_repository(str(tmp), bare=True)
        os.rename(tmp, self.mirror)

    def _write_state(self, state: _FetchState) -> None:
        with self.store.write() as connection:
            connection.execute("INSERT OR REPLACE INTO git_fetches (source, ended, error) VALUES (?, ?, ?)",
                               (self.name, state.ended, state.error))

    def _checkout(self, commit: str) -> SourceArgs:
        """The commit's tree as a directory for Nix, exported on first use and reused after."""
        target = self.checkouts / commit
        if not target.is_dir():
            self._export(commit, target)
            self._prune_checkouts()
        os.utime(target)
        return SourceArgs("path", str(target), f"{self.name} at {commit[:12]}")

    def _export(self, commit: str, target: Path) -> None:
        self.checkouts.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.checkouts, prefix=".export-"))
        try:
            repo = pygit2.Repository(str(self.mirror))
            repo.checkout_tree(repo[commit], directory=str(tmp),
                               strategy=CheckoutStrategy.FORCE | CheckoutStrategy.DONT_UPDATE_INDEX)
            tmp.chmod(0o755)
            os.rename(tmp, target)
        except OSError:
            # Another worker exported the same commit first: theirs is as good as ours.
            if not target.is_dir():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _prune_checkouts(self) -> None:
        cutoff = time.time() - CHECKOUT_MAX_AGE
        for entry in self.checkouts.iterdir():
            if COMMIT_RE.fullmatch(entry.name) and entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True)
