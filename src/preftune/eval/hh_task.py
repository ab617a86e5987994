"""The DPO paper's single-turn dialogue experiment on Anthropic HH (Fig. 3): a seeded split of the preference pairs
by prompt, the 2-shot prompt of the base-model baseline, and the cleaning of a sampled reply.

Split, by distinct prompt (so no prompt is both trained on and tested): ``test`` prompts, single-turn only, each
with the dataset's chosen response as the opponent every method is judged against; ``judge_val`` pairs, human
labelled and never trained on, for the judge card; ``train`` pairs, the rest (multi-turn ones included).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def is_single_turn(prompt: str) -> bool:
    """One human turn, ending where the assistant's reply begins."""
    return isinstance(prompt, str) and prompt.count(HUMAN) == 1 and prompt.rstrip().endswith(ASSISTANT.strip())


@dataclass
class HHSplit:
    train: list  # PreferencePair
    judge_val: list  # PreferencePair
    test: list  # (prompt, the dataset's chosen response)

    def sizes(self) -> dict[str, int]:
        return {"train_pairs": len(self.train), "judge_val_pairs": len(self.judge_val), "test_prompts": len(self.test)}


def split_by_prompt(pairs: list, *, test_prompts: int, judge_val_pairs: int, seed: int) -> HHSplit:
    """The seeded split described in the module docstring. ``test_prompts`` single-turn prompts are drawn first,
    then whole prompts go to ``judge_val`` until it holds at least ``judge_val_pairs`` pairs; a prompt's pairs never
    straddle two parts."""
    by_prompt: dict[str, list] = {}
    for pair in pairs:
        by_prompt.setdefault(pair.prompt, []).append(pair)
    prompts = sorted(by_prompt)
    random.Random(seed).shuffle(prompts)
    single = [p for p in prompts if is_single_turn(p)]
    if len(single) < test_prompts:
        from preftune.errors import InputError

        raise InputError(f"only {len(single)} single-turn prompts for {test_prompts} test prompts")
    test = single[:test_prompts]
    taken = set(test)
    judge_val: list = []
    for p in prompts:
        if len(judge_val) >= judge_val_pairs:
            break
        if p not in taken:
            judge_val += by_prompt[p]
            taken.add(p)
    train = [pair for p in prompts if p not in taken for pair in by_prompt[p]]
    return HHSplit(train=train, judge_val=judge_val, test=[(p, by_prompt[p][0].chosen) for p in test])


def two_shot_prompt(examples: list, prompt: str) -> str:
    """The paper's 2-shot baseline: two training dialogues (prompt + chosen reply) before the test prompt."""
    return "".join(e.prompt + e.chosen for e in examples[:2]) + prompt


def clean_reply(text: str) -> str:
    """A sampled reply up to the next turn marker (a base model goes on to write the human's next turn)."""
    for marker in (HUMAN, ASSISTANT, "\nHuman:", "\nAssistant:"):
        text = text.split(marker)[0]
    return text.rstrip()
