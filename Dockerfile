# Nixery's container image for those without Nix: Debian bookworm, Debian's Nix, and Nixery in a
# virtual environment made with Debian's Python (as scripts/install-deps makes .venv). The flake's
# image (`nix build .#image`) is the same service built with Nix.
#
#   docker build -t nixery .
#   docker run -p 8080:8080 -v nixery-store:/nix -v nixery-data:/var/lib/nixery nixery
#
# Nix runs as the image's own user, not root: the store (/nix) is a single-user store owned by
# `nixery` (uid 10000), with no nix-daemon and no build users. What that costs: builds run as
# that user without Nix's sandbox (a sandbox needs user namespaces, which a container's default
# seccomp profile refuses), so a package set's builders can read what that user can read; the
# start-up preflight says so. Run it with the root-owned store of a nix-daemon to have the
# sandbox back (docs/running-in-public.md).
FROM debian:bookworm-slim

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      nix-bin python3 python3-venv git ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# The single-user store and Nixery's state, owned by the user that runs both. Numeric ids, so that
# Kubernetes' runAsNonRoot can check them.
RUN groupadd --system --gid 10000 nixery \
 && useradd --system --uid 10000 --gid nixery --home-dir /var/lib/nixery --shell /usr/sbin/nologin nixery \
 && mkdir -p /nix/store /nix/var/nix /etc/nix /var/lib/nixery \
 && chown -R nixery:nixery /nix /var/lib/nixery \
 && printf '%s\n' \
      '# Single-user Nix: no build users (builds run as the one user that owns /nix).' \
      'build-users-group =' \
      > /etc/nix/nix.conf

COPY setup.py README.md LICENSE /opt/nixery/src/
COPY nixery /opt/nixery/src/nixery
COPY static /opt/nixery/src/static
RUN python3 -m venv /opt/nixery/venv \
 && /opt/nixery/venv/bin/python -m pip install --no-cache-dir --disable-pip-version-check -q '/opt/nixery/src[gcs]' \
 && rm -rf /opt/nixery/src

ENV PATH=/opt/nixery/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/var/lib/nixery \
    USER=nixery \
    STORAGE_PATH=/var/lib/nixery/storage \
    NIXERY_STATE_DIR=/var/lib/nixery/state \
    PORT=8080

USER 10000:10000
WORKDIR /var/lib/nixery
EXPOSE 8080
# The store grows with every image built, and the filesystem backend's blobs live in
# /var/lib/nixery: both belong on volumes, not in the container's writable layer.
VOLUME ["/nix", "/var/lib/nixery"]
# Gunicorn's graceful shutdown: running builds and pulls finish for up to NIXERY_GRACE_PERIOD
# seconds (give `docker stop -t` at least that), their clients' next requests are answered,
# no new build starts, and the listener closes once no request has come for 5 s.
STOPSIGNAL SIGTERM
# /healthz answers without touching storage or Nix (the Deployment's liveness probe too).
HEALTHCHECK --interval=20s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8080'), timeout=4)"]
ENTRYPOINT ["nixery"]
