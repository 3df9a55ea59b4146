"""Chat on a model whose template closes only assistant turns (Llama-2/Mistral ``[INST] user [/INST] reply</s>``): a
user turn and its reply are one utterance, as prep lays them out; the user's text opens it, the reply and the
end-of-turn token close it, and what is fed equals the template's own rendering."""

from __future__ import annotations

import pytest
import torch

from pipeline.inference.chat import user_turn
from pipeline.inference.chat_turns import TurnEncoder
from pipeline.inference.conversation import Conversation
from tests.chat_tokenizers import mistral_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mistral(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer

    from data_prep.tokenizer_loading import SpecialIds
    from pipeline.config import ModelConfig
    from pipeline.modeling.loader import build_model

    tok = AutoTokenizer.from_pretrained(mistral_tokenizer(tokenizer_dir, str(tmp_path_factory.mktemp("mistral") / "tok")))
    bos, eou = tok.convert_tokens_to_ids("<s>"), tok.convert_tokens_to_ids("</s>")
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2), len(tok),
                        SpecialIds(bos, eou, eou)).eval()
    return model, tok, bos, eou


def test_a_user_turn_opens_the_utterance_its_reply_closes(mistral):
    model, tok, bos, eou = mistral
    turns_in = TurnEncoder(tok, {"template": "chat", "pin_system": True})
    assert not turns_in.closes_user_turns and turns_in.opening() == (None, [])
    conv = Conversation(model, bos, eou, "streamingdialogue")
    logits = user_turn(conv, turns_in, "Hello there")
    fed = [h[0] for h in conv.history]
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hello there"}], tokenize=True)["input_ids"]
    assert fed == list(prompt) and tok.decode(fed[1:]) == "[INST] Hello there [/INST]"
    assert [h[1] for h in conv.history] == [0] + [1] * (len(fed) - 1) and conv.in_utterance  # open until the reply ends

    reply = conv.generate(logits, max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    assert eou not in reply and conv.history[-1][:3] == (eou, 1, True) and not conv.in_utterance
    turns_in.replied(tok.decode(reply))
    before = len(conv.history)
    user_turn(conv, turns_in, "Nice.")
    assert tok.decode([h[0] for h in conv.history[before:]]) == "[INST] Nice. [/INST]"
    assert {h[1] for h in conv.history[before:]} == {2}
    assert sum(h[2] for h in conv.history) == 1  # the EoU ends the first pair only; the second is open
