"""Random packed batches with dialogues of varied lengths (several per row, padding at the end), for mask tests."""

from __future__ import annotations

import torch


def random_packed_batch(B: int, T: int, kinds: list[str], seed: int = 0, max_utt_len: int = 12, max_utts: int = 9) -> dict:
    g = torch.Generator().manual_seed(seed)
    doc = torch.full((B, T), -1, dtype=torch.long)
    utt = torch.full((B, T), -1, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    eou = torch.zeros(B, T, dtype=torch.bool)
    blk = torch.full((B, T), -1, dtype=torch.long)
    for b in range(B):
        t, d = 0, 0
        while t < T - (max_utt_len + 4):
            t0 = t
            doc[b, t], utt[b, t], blk[b, t] = d, 0, 0  # BOS
            t += 1
            n = int(torch.randint(2, max_utts + 1, (), generator=g))
            for u in range(1, n + 1):
                L = int(torch.randint(1, max_utt_len + 1, (), generator=g))
                if t + L + 1 > T - 3:
                    break
                doc[b, t:t + L + 1], utt[b, t:t + L + 1] = d, u
                eou[b, t + L] = True
                if kinds[b] == "lmr":
                    blk[b, t:t + L + 1] = (u + 1) // 2  # pair index: query 2p-1 and response 2p share block p
                else:
                    blk[b, t:t + L + 1] = u
                t += L + 1
            pos[b, t0:t] = torch.arange(t - t0)
            d += 1
    return {"doc_ids": doc, "utt_ids": utt, "position_ids": pos, "eou": eou, "blk": blk, "mask_kind": list(kinds)}
