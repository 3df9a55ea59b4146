"""How chat and eval turn text into utterance token ids: bare utterances (the plain layout) or, for a model whose
convsink.json ``layout`` says ``template: chat``, the model's own chat template exactly as prep laid it out
(``data_prep.chat_template``): each turn with its role header, the template's opening system turn pinned with BOS,
replies opened by the assistant header and closed by the end-of-turn token (the EoU). A template that closes only
assistant turns (Llama-2/Mistral ``[INST] user [/INST] reply</s>``) makes a user turn and its reply one utterance, as
prep does: the user's text then opens the utterance that the reply and its end-of-turn token close."""

from __future__ import annotations

from data_prep.chat_template import ChatSpec, chat_spec, encode_dialogue, pinned
from data_prep.contract import ASSISTANT, ROLES, SYSTEM, USER
from data_prep.schema import DataError, Dialogue, Turn
from data_prep.tokenizer_loading import encode_utterance

CHAT_TEMPLATE = "chat"  # the value of data.template / convsink.json layout.template for the chat layout


class TurnEncoder:
    """Turns of one conversation → utterance token ids (EoU excluded), in the layout the model was trained on."""

    def __init__(self, tokenizer, layout: dict | None = None):
        layout = layout or {}
        self.tokenizer = tokenizer
        self.spec: ChatSpec | None = None
        if layout.get("template") == CHAT_TEMPLATE:
            self.spec = chat_spec(tokenizer, ROLES, bool(layout.get("pin_system", True)))
        self.history: list[Turn] = []
        self.closes_user_turns = self.spec is None or self._renders_closed([Turn(USER, "x")])

    @property
    def chat(self) -> bool:
        return self.spec is not None

    def _utterances(self, turns: list[Turn]):
        return encode_dialogue(self.spec, Dialogue("chat", tuple(turns), source="<chat>"))

    def _renders_closed(self, turns: list[Turn]) -> bool:
        """Whether the template closes the last of ``turns`` with its end-of-turn token."""
        try:
            self._utterances(turns)
        except DataError:
            return False
        return True

    def opening(self, system: str | None = None) -> tuple[list[int] | None, list[list[int]]]:
        """(pinned system utterance or None, utterances to add before the first user turn): the template's own
        opening turns (SmolLM2's default system prompt), or ``system`` rendered as the template's system turn in their
        place; plain layout: none, or ``system`` as a bare first utterance. A template that cannot render a system
        turn is a ValueError."""
        if self.spec is None:
            return None, [encode_utterance(self.tokenizer, system)] if system else []
        head = [Turn(SYSTEM, system)] if system else []
        try:
            turns = self._utterances(head + [Turn(USER, "")])
        except DataError as e:
            raise ValueError(f"chat.system: {e.reason}") from None
        self.history = head
        before = turns.utterances[:-1]
        if before and pinned(turns, self.spec):
            return before[0], before[1:]
        return None, before

    def user(self, text: str) -> list[int] | None:
        """The user's utterance (with its role header under the chat layout); None when the template does not close
        user turns: the user's text is then part of ``reply_prefix``."""
        if self.spec is None:
            return encode_utterance(self.tokenizer, text)
        self.history.append(Turn(USER, text))
        return self._utterances(self.history).utterances[-1] if self.closes_user_turns else None

    def reply_prefix(self) -> list[int]:
        """Tokens that open the model's reply before it generates: the assistant header (none when plain); for a
        template that closes only assistant turns, the user's turn too (``[INST] text [/INST]``)."""
        if self.spec is None:
            return []
        return self._utterances(self.history + [Turn(ASSISTANT, "")]).utterances[-1]

    def replied(self, text: str) -> None:
        """Record the model's reply (the next turn is rendered after it)."""
        if self.spec is not None:
            self.history.append(Turn(ASSISTANT, text))

    def continuation(self, texts: list[str]) -> tuple[list[list[int]], list[int]]:
        """(utterances of ``texts``, the opening of the next turn) for a history whose speakers alternate, the
        first being the user (eval's dialogues); plain: bare utterances and no opening."""
        if self.spec is None:
            return [encode_utterance(self.tokenizer, t) for t in texts], []
        roles = [USER if i % 2 == 0 else ASSISTANT for i in range(len(texts) + 1)]
        rendered = self._utterances([Turn(r, t) for r, t in zip(roles, list(texts) + [""])]).utterances
        return rendered[-(len(texts) + 1):-1], rendered[-1]

