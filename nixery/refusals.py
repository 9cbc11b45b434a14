"""Why the builder refuses a request, as domain exceptions: what was refused and the figures
behind it, never an HTTP status (nixery/error_handlers.py decides what a client is told)."""

from __future__ import annotations


class Refused(Exception):
    """The request may not build the image now."""


class BuildRefused(Refused):
    """The image is not built yet and this client may only pull what is (auth level `build`)."""

    MESSAGE = "authentication required to build a new image (images already built can be pulled without logging in)"

    def __init__(self, name: str):
        super().__init__(self.MESSAGE)
        self.name = name


class ServerStopping(Refused):
    """The server is stopping: it answers what needs no build (the images and blobs of the
    pulls it was serving) and starts no build; the client may retry after `retry_after`
    seconds (at another replica, or this instance restarted)."""

    def __init__(self, retry_after: int):
        super().__init__("this instance is stopping and starts no new build; retry in a moment")
        self.retry_after = retry_after


class TooManyBuilds(Refused):
    """The client already has `limit` new builds running (NIXERY_CLIENT_BUILDS); it may retry
    after `retry_after` seconds."""

    def __init__(self, limit: int, retry_after: int):
        super().__init__(f"this address already has {limit} new builds running")
        self.limit = limit
        self.retry_after = retry_after


class ImageTooLarge(Refused):
    """The image's packages take `size` bytes, over the instance's `limit` (NIXERY_MAX_IMAGE_SIZE);
    the same image is refused the same way again."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"the image's packages take {size} bytes, more than {limit}")
        self.size = size
        self.limit = limit
