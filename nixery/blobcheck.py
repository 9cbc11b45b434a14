"""Whether the blobs a stored manifest names are all still in storage: a pinned manifest is
answered from storage only when they are (nixery/admission.py), else its image is built again
(pulls that heal: nixery/heal.py, which forgets these checks when a blob request finds one gone).
"""

from __future__ import annotations

from .collector import references
from .manifest import Document
from .recent import Recent
from .storage import Backend

# A manifest whose blobs were all found is not looked at again for this long (seconds): on GCS each
# look is a request per blob. A blob removed meanwhile is healed by the blob request instead.
CHECKED_SECONDS = 30.0
# Manifests whose blobs were all found, shared by the process's builders and forgotten when a blob
# request finds one gone.
_checked = Recent(CHECKED_SECONDS)


class BlobCheck:
    """Whether every blob a stored manifest names is still in storage."""

    def __init__(self, storage: Backend):
        self.storage = storage

    def missing(self, document: Document) -> list[str]:
        """The keys of the blobs `document` names that are gone (none if checked lately)."""
        if _checked.fresh(document.digest):
            return []
        gone = [key for key in references(document.data).blobs if self.storage.stat(key) is None]
        if not gone:
            _checked.add(document.digest)
        return gone


def forget() -> None:
    """A blob was found gone: every manifest is checked again on its next request."""
    _checked.clear()
