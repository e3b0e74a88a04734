"""The playground (CLIPSERVE_PLAYGROUND=true): one static page at / and its two assets under /playground/.

The page talks to the public API only (/classify, /embed, /v1/models, /v1/classifiers), from its own origin, so it
needs nothing the API does not offer. It has no inline script or style, which lets `CSP` forbid both: a value that
reaches the page (a label, an error message) can only ever be text.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

# The page is static files from this origin; what it fetches is this origin's API; images it shows are the user's
# own files (blob: URLs of picked or pasted files). No forms submit anywhere and no one may frame it.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
    "form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate on each load, so a page and its assets never come from two versions of the server.
    "Cache-Control": "no-cache",
}
PAGE = "index.html"
# Every file the playground serves, and its media type; no other name is ever read.
MEDIA_TYPES = {
    PAGE: "text/html; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
}


class UnknownAsset(LookupError):
    pass


@cache
def asset(name: str) -> tuple[bytes, str]:
    """The bytes and media type of one of the playground's files; UnknownAsset for any other name."""
    media_type = MEDIA_TYPES.get(name)
    if media_type is None:
        raise UnknownAsset(name)
    return resources.files(__name__).joinpath(name).read_bytes(), media_type
