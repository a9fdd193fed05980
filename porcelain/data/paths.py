"""Image paths from a manifest: normalised, and refused when they could leave the image root."""

from __future__ import annotations

import re

__all__ = ["safe_relpath"]

_SCHEME_OR_DRIVE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def safe_relpath(image: str) -> tuple[str | None, tuple[str, str] | None]:
    """Normalise a manifest path; ``(path, None)`` if it stays under the root, else ``(None, (reason, detail))``.

    Backslashes count as separators, ``.`` and empty segments are dropped. Refused (``path_escape``):
    absolute paths, ``~``, any ``..`` segment, a drive letter or URL scheme (``C:``, ``s3://``,
    ``file:``) and control characters.
    """
    if not image:
        return None, ("empty_path", "the image cell is empty")
    if _CONTROL.search(image):
        return None, ("path_escape", "the path contains control characters")
    p = image.replace("\\", "/")
    if _SCHEME_OR_DRIVE.match(p):
        return None, ("path_escape", "paths must be relative to the image root; this one has a drive "
                                     "letter or URL scheme")
    if p.startswith("/"):
        return None, ("path_escape", "absolute path; paths must be relative to the image root")
    if p.startswith("~"):
        return None, ("path_escape", "home-directory path; paths must be relative to the image root")
    parts = [s for s in p.split("/") if s not in ("", ".")]
    if ".." in parts:
        return None, ("path_escape", "'..' segments are not allowed; paths must stay under the image root")
    if not parts:
        return None, ("empty_path", "the image path has no file name")
    return "/".join(parts), None
