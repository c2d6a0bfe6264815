"""Prompt lookup drafts (llmlab.engine.draft): the earlier occurrence whose match runs furthest back is the one
copied, and the incremental drafter drafts what the reference function does (token lists, no model)."""

import random

from llmlab.engine.draft import STRONGEST, LookupDrafter, lookup_draft


def test_the_occurrence_matching_furthest_back_is_copied():
    # "1 2 3 4 5" was copied up to now; "3 4 5" also occurs later, followed by 7: the passage being copied wins
    tokens = [1, 2, 3, 4, 5, 6, 8, 3, 4, 5, 7, 9, 1, 2, 3, 4, 5]
    assert lookup_draft(tokens, k=2) == [6, 8]
    draft = LookupDrafter().start(tokens, 100)
    assert draft.propose(tokens, 2, None)[0] == [6, 8]
    assert draft.strength(tokens) == 5  # the match "1 2 3 4 5"
    # equally long matches: the latest wins (recent text predicts best)
    assert lookup_draft([1, 2, 3, 9, 1, 2, 3, 7, 8, 2, 3], k=2) == [7, 8]
    # a match is counted up to STRONGEST tokens: beyond it, the latest of the long ones
    passage = list(range(10, 10 + STRONGEST + 2))
    tokens = passage + [1] + passage + [2] + passage
    assert lookup_draft(tokens, k=1) == [2] and LookupDrafter().start(tokens, 100).strength(tokens) == STRONGEST


def test_the_incremental_drafter_matches_the_reference_on_copied_text():
    for seed in range(100):  # text made of pieces of itself, as an answer quoting its passage
        rng = random.Random(seed)
        context = [rng.randrange(30) for _ in range(20)]
        draft = LookupDrafter().start(context, 1000)
        for _ in range(60):
            if rng.random() < 0.3:
                begin = rng.randrange(len(context))
                context += context[begin:begin + rng.randrange(1, 6)]
            else:
                context.append(rng.randrange(30))
            k = rng.randrange(1, 8)
            assert draft.propose(context, k, None)[0] == lookup_draft(context, k), (seed, context, k)

