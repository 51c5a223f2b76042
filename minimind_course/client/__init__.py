"""The client layer (HTTP only, no torch): the history window, ``ChatSession``, the terminal chat, the notebook widget."""

from minimind_course.client.session import ChatSession, Delta, Reply

__all__ = ["ChatSession", "Delta", "Reply"]
