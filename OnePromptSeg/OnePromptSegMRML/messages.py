"""User-facing errors of the adapter and their translation.

Inside Slicer messages go through Slicer's translation function; outside (tests on slicer-core, which has no
``slicer.i18n``) they are shown as written.
"""
try:
    from slicer.i18n import tr as _
except ImportError:  # slicer-core: no translations
    def _(text: str) -> str:
        return text


class InputError(ValueError):
    """Something about the user's nodes that prevents a run; the message says what to do.  Nothing was changed."""


__all__ = ["InputError", "_"]
