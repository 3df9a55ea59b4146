"""One model through one cache, as ``convsink bench method`` evaluates it: method.md §4 perplexity teacher-forced
utterance by utterance through the cache, with the cache's size after every utterance; the last utterance generated
with the same cache (BLEU, ROUGE, Distinct; ms per decoded token); the recall probe.

The equal-size baselines (``SDMatchedWindow``): a StreamingLLM cache (``sink_tokens`` sinks, or none for a local
window) whose sinks + window equal, at every moment, what the StreamingDialogue cache holds for the same
conversation. It runs the real ``StreamingDialoguePolicy`` on a shadow of the conversation's token metadata (no model),
so the size it matches is the StreamingDialogue cache's own held count (1 + T + the last two utterances), not a
formula of ours.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F

from data_prep.tokenizer_loading import encode_utterance
from pipeline.contract import DENSE_CACHE, STREAMINGDIALOGUE_CACHE, STREAMINGLLM_CACHE
from pipeline.evaluation.metrics import score_predictions, token_f1
from pipeline.evaluation.recall_probe import RECALL_PROMPT
from pipeline.inference.policies import CacheFacts, Keep, StreamingDialoguePolicy

STREAMINGLLM_MATCHED, LOCAL_MATCHED = "streamingllm_same_size", "local_same_size"  # the equal-size baselines
CACHE_CASES = (STREAMINGDIALOGUE_CACHE, DENSE_CACHE, STREAMINGLLM_MATCHED, LOCAL_MATCHED)


class SDMatchedWindow:
    """StreamingLLM (first ``sink_tokens`` + the most recent tokens, keys re-rotated in the cache) holding exactly as
    many positions as the StreamingDialogue cache would at every hook; ``sink_tokens=0`` is a local window. One
    instance per conversation (it tracks that conversation's metadata)."""

    name = STREAMINGLLM_CACHE  # the cache frame of StreamingLLM: pre-rotary keys, positions inside the cache

    def __init__(self, sink_tokens: int):
        self.sink_tokens = sink_tokens
        self.reference = StreamingDialoguePolicy()
        self.utt, self.eou = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool)
        self.seen = 0  # conversation tokens already in the shadow

    def _shadow(self, cache: CacheFacts) -> CacheFacts:
        return CacheFacts(utt=self.utt, eou=self.eou, utterance=cache.utterance, history_tokens=cache.history_tokens,
                          pinned=cache.pinned)

    def _follow(self, decision) -> None:
        """Prune the shadow as the StreamingDialogue policy decided."""
        if isinstance(decision, Keep):
            self.utt, self.eou = self.utt[decision.index], self.eou[decision.index]

    def _fit(self, cache: CacheFacts):
        """Keep the first sinks and the most recent tokens, as many in all as the shadow holds."""
        budget, n = len(self.utt), len(cache)
        if n <= budget:
            return None
        sinks = min(max(self.sink_tokens, cache.pinned), budget)
        idx = torch.arange(n)
        return Keep((idx < sinks) | (idx >= n - (budget - sinks)))

    def before_utterance(self, cache: CacheFacts):
        self._follow(self.reference.before_utterance(self._shadow(cache)))
        return self._fit(cache)

    def after_forward(self, cache: CacheFacts):
        new = cache.history_tokens - self.seen  # the tokens just cached are the last ``new`` positions
        if new > 0:
            self.utt = torch.cat([self.utt, cache.utt[-new:]])
            self.eou = torch.cat([self.eou, cache.eou[-new:]])
            self.seen = cache.history_tokens
        self._follow(self.reference.after_forward(self._shadow(cache)))
        return self._fit(cache)


def make_conversation(model, info, case: str, sink_tokens: int):
    """A fresh conversation with the cache ``case`` (one of ``CACHE_CASES``)."""
    from pipeline.inference.conversation import Conversation

    policy = {STREAMINGLLM_MATCHED: lambda: SDMatchedWindow(sink_tokens), LOCAL_MATCHED: lambda: SDMatchedWindow(0)
              }.get(case, lambda: case)()
    return Conversation(model, info.bos_token_id, info.eou_token_id, policy)


def truncated(tokenizer, dialogue, max_tokens: int) -> tuple[list[str], list[list[int]]]:
    """(texts, token ids) of the dialogue's first utterances that fit ``max_tokens`` laid out ([BOS] u EoU ...)."""
    texts, ids, used = [], [], 1
    for turn in dialogue.turns:
        u = encode_utterance(tokenizer, turn.text)
        if used + len(u) + 1 > max_tokens:
            break
        texts.append(turn.text)
        ids.append(u)
        used += len(u) + 1
    return texts, ids


def teacher_forced(model, info, case: str, sink_tokens: int, utterances: list[list[int]]) -> list[dict]:
    """Feed the utterances one forward each; per utterance t: its next-token NLL sum and count (the EoU that ends
    utterance t-1 predicts its first token; its own EoU included) and the cache held after it."""
    conv = make_conversation(model, info, case, sink_tokens)
    previous, points = conv.bos_logits, []
    for t, u in enumerate(utterances, start=1):
        logits = conv.add_utterance(u)  # (len(u) + 1, V): row i predicts token i + 1 of the utterance
        rows = torch.cat([previous[None], logits[:-1]])
        nll = F.cross_entropy(rows.float(), torch.tensor(list(u) + [info.eou_token_id]), reduction="sum")
        previous = logits[-1]
        points.append({"utterances": t, "nll_sum": float(nll), "tokens": len(u) + 1, "positions": len(conv.store),
                       "kv_bytes": conv.store.nbytes(), "conversation_tokens": conv.next_position})
    return points


def timed_reply(model, info, case: str, sink_tokens: int, history: list[list[int]], max_new_tokens: int
                ) -> tuple[list[int], float]:
    """Teacher-force ``history``, then generate (greedy) the next utterance; (reply ids, seconds per fed token)."""
    conv = make_conversation(model, info, case, sink_tokens)
    for u in history:
        conv.add_utterance(u, all_logits=False)
    t0 = time.perf_counter()
    reply = conv.generate(None, max_new_tokens)
    return reply, (time.perf_counter() - t0) / (len(reply) + 1)  # + its closing EoU


@torch.no_grad()
def evaluate_case(model, tokenizer, info, dialogues: list, case: str, sink_tokens: int = 4, max_tokens: int = 1024,
                  max_new_tokens: int = 32, recall_after: int = 10) -> dict:
    """Everything the bench reports for one model through one cache, per dialogue and summarised."""
    per_dialogue, predictions, references, seconds, probes = [], [], [], [], []
    for d in dialogues:
        texts, utts = truncated(tokenizer, d, max_tokens)
        if len(utts) < 2:
            continue
        per_dialogue.append({"dialogue_id": d.id, "utterance_tokens": [len(u) for u in utts],
                             "points": teacher_forced(model, info, case, sink_tokens, utts)})
        reply, s = timed_reply(model, info, case, sink_tokens, utts[:-1], max_new_tokens)
        predictions.append(tokenizer.decode(reply, skip_special_tokens=True).strip())
        references.append(texts[-1])
        seconds.append(s)
        if len(utts) > recall_after:
            first = texts[0]
            ask = utts[:recall_after] + [encode_utterance(tokenizer, RECALL_PROMPT)]
            answer, _ = timed_reply(model, info, case, sink_tokens, ask, max(max_new_tokens, len(utts[0]) + 1))
            text = tokenizer.decode(answer, skip_special_tokens=True).strip()
            probes.append({"dialogue_id": d.id, "exact": float(" ".join(text.split()) == " ".join(first.split())),
                           "f1": token_f1(text, first)})
    if not per_dialogue:
        raise ValueError("no held-apart dialogue has 2 utterances within the token limit")
    return {"cache": case, "sink_tokens": sink_tokens if case == STREAMINGLLM_MATCHED else 0 if case == LOCAL_MATCHED else None,
            "perplexity": summarise_perplexity(per_dialogue), "curve": curve(per_dialogue),
            "generation": score_predictions(predictions, references), "predictions": predictions,
            "ms_per_token": 1000 * statistics.median(seconds),
            "recall_probe": {"turns_before_question": recall_after, "question": RECALL_PROMPT, "n": len(probes),
                             "exact_match": sum(p["exact"] for p in probes) / max(len(probes), 1),
                             "token_f1": sum(p["f1"] for p in probes) / max(len(probes), 1)},
            "dialogues": per_dialogue}


def summarise_perplexity(per_dialogue: list[dict]) -> dict:
    """method.md §4: per dialogue the mean NLL over utterances 2..n (EoUs included), then averaged; exp of it."""
    means = []
    for d in per_dialogue:
        scored = [p for p in d["points"] if p["utterances"] >= 2]
        means.append(sum(p["nll_sum"] for p in scored) / sum(p["tokens"] for p in scored))
    mean = sum(means) / len(means)
    return {"dialogues": len(means), "mean_nll": mean, "ppl": math.exp(mean)}


def curve(per_dialogue: list[dict]) -> list[dict]:
    """Per number of utterances T (2..): perplexity of utterance T (mean over the dialogues that reach it of its
    per-token NLL) and the cache held after it (mean positions and K/V bytes over those dialogues)."""
    out = []
    for T in range(2, max(len(d["points"]) for d in per_dialogue) + 1):
        pts = [d["points"][T - 1] for d in per_dialogue if len(d["points"]) >= T]
        nll = sum(p["nll_sum"] / p["tokens"] for p in pts) / len(pts)
        out.append({"utterances": T, "dialogues": len(pts), "ppl": math.exp(nll),
                    "positions": sum(p["positions"] for p in pts) / len(pts),
                    "kv_bytes": sum(p["kv_bytes"] for p in pts) / len(pts)})
    return out
