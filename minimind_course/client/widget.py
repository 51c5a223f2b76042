"""A chat box for notebooks (ipywidgets) on top of :class:`~minimind_course.client.ChatSession`.

The answer streams into the page as it is generated; the history view marks which pairs the next question
carries, and the slider sets how many pairs that is (``session.max_pairs``).
"""

from __future__ import annotations

import html

import ipywidgets as widgets
import openai

from minimind_course.client import ChatSession, Reply
from minimind_course.client.history import PromptTooLongError

BOX = "white-space:pre-wrap;font-family:var(--jp-code-font-family,monospace);font-size:90%"


class ChatWidget(widgets.VBox):
    """Input box, Send and Reset buttons, a history-size slider, the history view and the live answer."""

    def __init__(self, session: ChatSession, *, max_history: int = 10, stream: bool = True) -> None:
        self.session = session
        self.stream = stream
        if session.max_pairs is None or session.max_pairs > max_history:
            session.max_pairs = max_history
        self.history_slider = widgets.IntSlider(
            value=session.max_pairs, min=0, max=max_history, description="history pairs",
            style={"description_width": "initial"},
        )
        self.input = widgets.Text(placeholder="Ask something", layout=widgets.Layout(width="60%"))
        self.send_button = widgets.Button(description="Send", button_style="primary")
        self.reset_button = widgets.Button(description="Reset")
        self.history_view = widgets.HTML()
        self.answer_view = widgets.HTML()
        self.status = widgets.HTML()
        self.send_button.on_click(lambda _: self.send(self.input.value))
        self.reset_button.on_click(lambda _: self.reset())
        self.history_slider.observe(self._on_slider, names="value")
        controls = widgets.HBox([self.input, self.send_button, self.reset_button])
        super().__init__([self.history_slider, self.history_view, controls, self.answer_view, self.status])
        self.refresh()

    def __repr__(self) -> str:
        return f"ChatWidget(model={self.session.model!r}, pairs={len(self.session.pairs)})"

    def send(self, text: str) -> Reply | None:
        """Ask ``text``, streaming the answer into the view; returns the reply, or None after an error."""
        question = text.strip()
        if not question:
            return None
        self.input.value = ""
        self.send_button.disabled = self.reset_button.disabled = True
        self.status.value = ""
        shown = [f"<b>you:</b> {html.escape(question)}\n<b>{html.escape(self.session.model)}:</b> "]
        self.answer_view.value = self._box("".join(shown))
        try:
            if self.stream:
                for delta in self.session.stream(question):
                    if delta.reasoning_content:
                        shown.append(f'<span style="opacity:.6">{html.escape(delta.reasoning_content)}</span>')
                    shown.append(html.escape(delta.content))
                    self.answer_view.value = self._box("".join(shown))
                reply = self.session.last_reply
            else:
                reply = self.session.ask(question, stream=False)
                self.answer_view.value = self._box("".join(shown) + html.escape(reply.content))
        except (openai.OpenAIError, PromptTooLongError) as error:
            self.status.value = f'<span style="color:#b00">error: {html.escape(str(error))}</span>'
            return None
        finally:
            self.send_button.disabled = self.reset_button.disabled = False
            self.refresh()
        if reply is not None and reply.usage is not None:
            self.status.value = (
                f"{reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens; "
                f"sent {len(reply.sent)} messages"
            )
        return reply

    def reset(self) -> None:
        """Forget the conversation and clear the views."""
        self.session.reset()
        self.answer_view.value = self.status.value = ""
        self.refresh()

    def refresh(self) -> None:
        """Redraw the history view: pairs the next question carries are bold, the others are greyed out."""
        pairs = self.session.pairs
        if not pairs:
            self.history_view.value = self._box("<i>no history yet</i>")
            return
        carried = self.session.carried_pairs()
        first_carried = len(pairs) - carried
        rows = []
        for number, pair in enumerate(pairs, 1):
            style = "font-weight:bold" if number > first_carried else "opacity:.45"
            text = f"{number}. user: {pair.question}\n   assistant: {pair.answer}"
            rows.append(f'<div style="{style}">{html.escape(text)}</div>')
        note = f"<i>bold: sent with the next question ({carried} of {len(pairs)} pairs)</i>"
        self.history_view.value = self._box("".join(rows) + note)

    def _on_slider(self, change: dict) -> None:
        self.session.max_pairs = change["new"]
        self.refresh()

    @staticmethod
    def _box(inner: str) -> str:
        return f'<div style="{BOX}">{inner}</div>'
