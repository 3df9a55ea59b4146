"""Recall probe: after ``recall_after`` turns of a dialogue the user asks for the first utterance verbatim; exact
match (after whitespace normalisation) and token F1 (lower-cased whitespace tokens) against it.
"""

from __future__ import annotations

from data_prep.tokenizer_loading import encode_utterance
from pipeline.contract import ExportInfo
from pipeline.evaluation.metrics import token_f1

RECALL_PROMPT = "Can you repeat exactly the first thing that was said in this conversation?"


def _continue_batch(model, tokenizer, info: ExportInfo, settings, histories: list[list[str]], max_new_tokens: int,
                    batch_size: int) -> list[str]:
    """For each history (utterance texts): teacher-force it, then generate the next utterance (greedy)."""
    from pipeline.inference.chat import open_conversation
    from pipeline.inference.conversation import generate_batch

    out = []
    for start in range(0, len(histories), batch_size):
        convs, starts = [], []
        for history in histories[start:start + batch_size]:
            conv, turns_in = open_conversation(model, tokenizer, info, settings)  # the model's layout (convsink.json)
            utterances, opening = turns_in.continuation(history)
            for ids in utterances:
                conv.add_utterance(ids, all_logits=False)
            logits = conv.last_logits
            for t in opening:  # the next turn's role header (chat template)
                logits = conv.feed_token(t)
            convs.append(conv)
            starts.append(logits)
        replies = generate_batch(convs, starts, max_new_tokens)
        out += [tokenizer.decode(r, skip_special_tokens=True).strip() for r in replies]
    return out


def generate_and_probe(model, tokenizer, dialogues: list, info: ExportInfo, settings, max_new_tokens: int, recall_after: int,
                       batch_size: int = 8) -> dict:
    """Generate the last utterance of each dialogue from the others; recall probe on dialogues longer than
    ``recall_after`` turns."""
    predictions = _continue_batch(model, tokenizer, info, settings, [[t.text for t in d.turns[:-1]] for d in dialogues],
                                  max_new_tokens, batch_size)
    probed = [d for d in dialogues if len(d.turns) > recall_after]
    histories = [[t.text for t in d.turns[:recall_after]] + [RECALL_PROMPT] for d in probed]
    firsts = [d.turns[0].text for d in probed]
    budget = max([max_new_tokens] + [len(encode_utterance(tokenizer, f)) + 1 for f in firsts])
    answers = _continue_batch(model, tokenizer, info, settings, histories, budget, batch_size)
    items = [dict(dialogue=d.id, asked_for=f, answer=a, exact=float(" ".join(a.split()) == " ".join(f.split())),
                  f1=token_f1(a, f)) for d, f, a in zip(probed, firsts, answers)]
    summary = {"turns_before_question": recall_after, "question": RECALL_PROMPT, "n": len(items),
               "exact_match": sum(i["exact"] for i in items) / max(len(items), 1),
               "token_f1": sum(i["f1"] for i in items) / max(len(items), 1), "items": items}
    return {"predictions": predictions, "recall_probe": summary}
