"""The chat-template layout (``data.template: chat``): each dialogue rendered by the tokenizer's own chat template.

The template is rendered (jinja, as ``transformers.apply_chat_template`` does) around placeholders, so its own
tokens (``<|im_start|>``, ``<|eot_id|>``, ``[INST]`` ...) become real special tokens while the text of the data
never does: content is tokenized as text (``<|im_end|>`` typed by a user stays text). Layout conventions:

* The attention sink (BOS, utterance 0) is the first token of the rendered dialogue: the template's own opening
  token (``<|begin_of_text|>`` for Llama-3, ``<s>`` for Llama-2/Mistral; for ChatML (SmolLM2, Qwen) the
  ``<|im_start|>`` that opens the first turn, which is also SmolLM2's BOS). No second BOS is added.
* The EoU is the template's end-of-turn token, found by rendering a user/assistant exchange (the first special
  token after the assistant's content): ``<|im_end|>``, ``<|eot_id|>``, ``</s>``.
* Utterance k = every token after the (k-1)-th end-of-turn token up to its own end-of-turn token: the role header
  (and the separator before it, ChatML's ``\\n``) belongs to its utterance. Text after the last end-of-turn token
  (ChatML's trailing ``\\n``) is not laid out: ``[sink] u1 EoU ... un EoU`` equals
  ``apply_chat_template(messages, tokenize=True)`` with that trailing separator removed. No generation prompt.
* A template that closes only some turns (Llama-2/Mistral: ``[INST] user [/INST] assistant</s>``) makes one
  utterance of the turns up to each end-of-turn token (a user/assistant pair); its role is its last turn's.
* A turn the template injects itself (SmolLM2's default system prompt) is an utterance of role ``system``.
* A pinned system turn (``data.pin_system``) shares utterance 0 with the sink and heads every window of a dialogue
  longer than ``seq_len`` (``chat_windows``); its loss counts in window 0 only.
* Labels (``data.train_on``): only content tokens of the chosen roles and the EoU of an utterance whose role is
  chosen; role headers and template text never carry loss.
* Speakers that are not roles (PersonaChat/MSC ``A``/``B``, names) alternate: the dialogue's first speaker is
  ``user``, any other ``assistant``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache

from data_prep.contract import ASSISTANT, ROLES, SYSTEM, USER
from data_prep.schema import DataError, Dialogue

_OPEN, _CLOSE = "\ue000", "\ue001"  # placeholder brackets (Unicode private use: never in a template)


@dataclass(frozen=True)
class ChatSpec:
    """What a worker needs to lay out dialogues with a chat template (picklable, no transformers)."""

    template: str = field(repr=False)
    bos_token: str
    eos_token: str
    specials: tuple  # (text, id) of every added token of the tokenizer, longest text first
    eou_text: str
    tokenizer_json: str = field(repr=False)
    train_on: tuple = ROLES
    pin_system: bool = True


@dataclass
class ChatTurns:
    """One dialogue rendered: utterance tokens (EoU excluded), per-token loss, per-utterance role and EoU loss. A
    loss code is 0 (no loss) or 1 + the index in ``ROLES`` of the role whose token it is."""

    utterances: list[list[int]]
    supervised: list[list[int]]
    roles: list[str]
    eou_supervised: list[int]
    sink: int
    dialogue: Dialogue | None = None


def template_of(tokenizer) -> str:
    """The tokenizer's chat template (a string), or ValueError naming the tokenizer."""
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):
        tpl = tpl.get("default")
    if not tpl:
        raise ValueError(f"data.template: chat needs a chat template; tokenizer {tokenizer.name_or_path} has none")
    return tpl


def chat_spec(tokenizer, train_on: tuple = ROLES, pin_system: bool = True) -> ChatSpec:
    """The chat layout of a transformers fast tokenizer; its end-of-turn token found by rendering the template."""
    raw = tokenizer.backend_tokenizer
    specials = sorted(((t.content, i) for i, t in raw.get_added_tokens_decoder().items()), key=lambda s: -len(s[0]))
    spec = ChatSpec(template_of(tokenizer), tokenizer.bos_token or "", tokenizer.eos_token or "", tuple(specials), "",
                    raw.to_str(), tuple(train_on), pin_system)
    text = render(spec, [(USER, _OPEN + "0" + _CLOSE), (ASSISTANT, _OPEN + "1" + _CLOSE)], "<template>", 0)
    after = text.split(_OPEN + "1" + _CLOSE, 1)[1]
    found = [(m.start(), -len(t), t) for t, _ in specials for m in [re.search(re.escape(t), after)] if m]
    if not found:
        raise ValueError(f"tokenizer {tokenizer.name_or_path}: its chat template closes no assistant turn with a special "
                         f"token, so there is no end-of-turn token for the EoU")
    return ChatSpec(**{**spec.__dict__, "eou_text": min(found)[2]})


@lru_cache(maxsize=8)
def _compiled(template: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render(spec: ChatSpec, messages: list[tuple[str, str]], source: str, line) -> str:
    """The template's text for ``messages`` ((role, content) pairs); a turn it rejects is a one-line DataError."""
    try:
        return _compiled(spec.template).render(messages=[{"role": r, "content": c} for r, c in messages],
                                               bos_token=spec.bos_token, eos_token=spec.eos_token,
                                               add_generation_prompt=False)
    except Exception as e:  # the template's own raise_exception, or a jinja error on an unexpected role
        roles = ",".join(r for r, _ in messages)
        raise DataError(source, line, f"turns.speaker: the chat template cannot render roles [{roles}]: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}", "template_role") from None


def roles_of(dialogue: Dialogue) -> list[str]:
    """Each turn's role: its speaker when it is a role, else by alternation (first speaker user, others assistant)."""
    first = dialogue.turns[0].speaker if dialogue.turns else ""
    return [t.speaker if t.speaker in ROLES else USER if t.speaker == first else ASSISTANT for t in dialogue.turns]


@lru_cache(maxsize=4)
def _encoder(tokenizer_json: str):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_str(tokenizer_json)
    raw.no_truncation()
    raw.no_padding()
    raw.encode_special_tokens = True  # text of the data (and of the template between its specials) stays text
    return raw


def _special_cuts(text: str, spans: list[tuple[int, int]], specials) -> list[tuple[int, int, int]]:
    """(start, end, id) of the special tokens in ``text`` outside the content ``spans``."""
    pattern = re.compile("|".join(re.escape(t) for t, _ in specials)) if specials else None
    ids = dict(specials)
    cuts, bounds = [], [0] + [p for s in spans for p in s] + [len(text)]
    for a, b in zip(bounds[0::2], bounds[1::2]):
        if pattern is not None:
            cuts += [(a + m.start(), a + m.end(), ids[m.group()]) for m in pattern.finditer(text[a:b])]
    return cuts


def encode_dialogue(spec: ChatSpec, dialogue: Dialogue) -> ChatTurns:
    """Render ``dialogue`` with the template and cut it into utterances at the end-of-turn token."""
    roles = roles_of(dialogue)
    marks = [f"{_OPEN}{i}{_CLOSE}" for i in range(len(roles))]
    text = render(spec, list(zip(roles, marks)), dialogue.source, dialogue.line)
    spans, out, pos = [], [], 0
    for i, (mark, turn) in enumerate(zip(marks, dialogue.turns)):
        at = text.find(mark, pos)
        if at < 0 or text.count(mark) != 1:
            raise DataError(dialogue.source, dialogue.line, f"turns[{i}]: the chat template does not render this "
                            f"{roles[i]} turn exactly once, in order", "template_role")
        out.append(text[pos:at])
        start = sum(map(len, out))
        out.append(turn.text)
        spans.append((start, start + len(turn.text)))
        pos = at + len(mark)
    full = "".join(out) + text[pos:]
    tokens = _tokens(spec, full, spans)
    return _cut(spec, tokens, roles, dialogue)


def _tokens(spec: ChatSpec, full: str, spans) -> list[tuple[int, int]]:
    """(id, message index or -1 for template text) of every token of ``full``."""
    cuts = _special_cuts(full, spans, spec.specials)
    runs, prev = [], 0
    for a, b, _ in cuts + [(len(full), len(full), -1)]:
        runs.append((prev, a))
        prev = b
    encs = _encoder(spec.tokenizer_json).encode_batch([full[a:b] for a, b in runs], add_special_tokens=False)
    out = []
    for k, ((a, _), enc) in enumerate(zip(runs, encs)):
        for tid, (s, e) in zip(enc.ids, enc.offsets):
            msg = next((i for i, (cs, ce) in enumerate(spans) if a + e > cs and a + s < ce), -1)
            out.append((tid, msg))
        if k < len(cuts):
            out.append((cuts[k][2], -1))
    return out


def _cut(spec: ChatSpec, tokens, roles: list[str], dialogue: Dialogue) -> ChatTurns:
    eou = dict(spec.specials)[spec.eou_text]
    if not tokens or tokens[0][1] != -1:
        raise DataError(dialogue.source, dialogue.line, "the chat template does not open with a token of its own "
                        "(the attention sink)", "template_role")
    turns = ChatTurns([], [], [], [], tokens[0][0])
    current: list[tuple[int, int]] = []
    for tid, msg in tokens[1:]:
        if tid == eou and msg == -1:
            owners = [m for _, m in current if m >= 0]
            role = roles[owners[-1]] if owners else SYSTEM
            turns.utterances.append([t for t, _ in current])
            turns.supervised.append([_code(roles[m], spec) if m >= 0 else 0 for _, m in current])
            turns.roles.append(role)
            turns.eou_supervised.append(_code(role, spec) if owners else 0)
            current = []
        else:
            current.append((tid, msg))
    late = [m for _, m in current if m >= 0]
    if late:
        raise DataError(dialogue.source, dialogue.line, f"turns[{late[0]}]: the chat template does not close this "
                        f"{roles[late[0]]} turn with its end-of-turn token {spec.eou_text}", "template_role")
    return turns


def _code(role: str, spec: ChatSpec) -> int:
    return 1 + ROLES.index(role) if role in spec.train_on and role in ROLES else 0


def pinned(turns: ChatTurns, spec: ChatSpec) -> bool:
    """Whether the first utterance is a system turn laid out with utterance index 0 (``data.pin_system``)."""
    return spec.pin_system and bool(turns.roles) and turns.roles[0] == SYSTEM


def chat_columns(cols: dict, utt_lens, flags, eou_flags, windows: list[tuple[int, int]], pin: list[bool]) -> dict:
    """``windows.layout_columns`` output with the chat layout applied, in place: labels only on supervised tokens
    (``flags``: loss codes per token of the utterances, as ``tokens``; ``eou_flags``: per utterance), in each
    ``pin`` window the first utterance (a system turn) moved to utterance 0 with the sink, the others renumbered
    from 1; ``supervised_by_role``: per window, a JSON object role -> supervised tokens."""
    import numpy as np

    from data_prep.contract import BLK, EOU, INPUT_IDS, IGNORE, LABELS, UTT_IDS
    from data_prep.tokenizer_loading import SpecialIds
    from data_prep.windows import layout_columns

    code = layout_columns(utt_lens, np.asarray(flags, dtype=np.int32), windows, SpecialIds(0, 0, 0))[INPUT_IDS]
    code[np.nonzero(cols[EOU])[0]] = np.asarray(eou_flags, dtype=np.int32)
    cols[LABELS] = np.where(code > 0, cols[INPUT_IDS], IGNORE).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(cols["lengths"])]).astype(np.int64)
    counts = [np.bincount(code[a:b], minlength=len(ROLES) + 1) for a, b in zip(starts[:-1], starts[1:])]
    cols["supervised_by_role"] = [json.dumps({r: int(c[1 + i]) for i, r in enumerate(ROLES) if c[1 + i]}) for c in counts]
    for w in np.nonzero(np.asarray(pin, dtype=np.bool_))[0]:
        for name in (UTT_IDS, BLK):
            part = cols[name][starts[w]:starts[w + 1]]
            part[part > 0] -= 1
    return cols


@dataclass
class ChatWindows:
    """A rendered dialogue cut into windows: ``utterances``/``supervised``/``eou_supervised`` as laid out (with a
    pinned system turn repeated at the head of every window, its later copies without loss), ``plan`` the
    utterance range ``[a, b)`` of each window over them, ``pin`` whether each window opens with the pinned turn."""

    utterances: list[list[int]]
    supervised: list[list[int]]
    eou_supervised: list[int]
    plan: list[tuple[int, int]]
    pin: list[bool]


def chat_windows(turns: ChatTurns, spec: ChatSpec, seq_len: int) -> ChatWindows | tuple[int, int]:
    """Windows of ``seq_len`` tokens at utterance boundaries. A pinned system turn (``pinned``) opens every window,
    so the instructions stay visible after a split: window k holds ``[sink] system EoU u_a EoU ... u_b EoU``. Returns
    ``(turn, pinned_tokens)`` instead when that turn cannot fit a window on its own (with the pinned turn when
    ``pinned_tokens`` > 0): the caller rejects the dialogue (``too_long``)."""
    from data_prep.windows import plan_windows

    lens = [len(u) for u in turns.utterances]
    if not pinned(turns, spec):
        plan = plan_windows(lens, seq_len)
        if isinstance(plan, int):
            return plan, 0
        return ChatWindows(turns.utterances, turns.supervised, turns.eou_supervised, plan, [False] * len(plan))
    if lens[0] + 2 > seq_len:
        return 0, 0
    rest = plan_windows(lens[1:], seq_len - lens[0] - 1)  # every window also holds the system turn and its EoU
    if isinstance(rest, int):
        return rest + 1, lens[0]
    out = ChatWindows([], [], [], [], [True] * len(rest))
    for k, (a, b) in enumerate(rest):
        start = len(out.utterances)
        out.utterances += [turns.utterances[0]] + turns.utterances[1 + a:1 + b]
        sys_loss = turns.supervised[0] if k == 0 else [0] * lens[0]  # a repeat is context: its loss counts once
        out.supervised += [sys_loss] + turns.supervised[1 + a:1 + b]
        out.eou_supervised += [turns.eou_supervised[0] if k == 0 else 0] + turns.eou_supervised[1 + a:1 + b]
        out.plan.append((start, len(out.utterances)))
    return out

