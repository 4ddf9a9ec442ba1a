"""The zoo's text tasks: answers are right and short, splits are disjoint, the tokenizer round-trips."""

from __future__ import annotations

import random

import pytest

from mergekit_plus.zoo.lm import TrainingStream, collate
from mergekit_plus.zoo.tasks import EOS_ID, SEPARATOR, TASKS, encode, sample_split, save_tokenizer, vocabulary

HAND_CHECKED = {
    "first_last": ("Fhello>", "ho"),
    "count_letter": ("Cbabcbb>", "3"),
    "add": ("A457>", "52"),
    "next_letters": ("Nabz>", None),  # z never occurs as input: it has no successor
    "sort": ("Scab>", "abc"),
    "middle": ("Mabcde>", "c"),
    "vowels": ("Vbanana>", "3"),
    "last_two": ("Lhello>", "ol"),
    "char_at": ("I3abcdef>", "c"),
    "subtract": ("D427>", "35"),
}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_answers_short(name):
    rng = random.Random(0)
    for _ in range(200):
        prompt, answer = TASKS[name].example(rng)
        assert prompt.startswith(TASKS[name].tag)
        assert prompt.endswith(SEPARATOR)
        assert 1 <= len(answer) <= 3


def test_task_answers_hand_checked():
    """Each generator's answer follows its description on a drawn example, checked by a second rule."""
    rules = {
        "first_last": lambda text: text[0] + text[-1],
        "count_letter": lambda text: str(text[1:].count(text[0])),
        "add": lambda text: str(int(text[:2]) + int(text[2])),
        "next_letters": lambda text: "".join(chr(ord(c) + 1) for c in text),
        "sort": lambda text: "".join(sorted(text)),
        "middle": lambda text: text[len(text) // 2],
        "vowels": lambda text: str(sum(c in "aeiou" for c in text)),
        "last_two": lambda text: text[:-3:-1],
        "char_at": lambda text: text[int(text[0])],
        "subtract": lambda text: str(int(text[:2]) - int(text[2])),
    }
    rng = random.Random(1)
    for name, rule in rules.items():
        for _ in range(50):
            prompt, answer = TASKS[name].example(rng)
            assert answer == rule(prompt[1:-1]), (name, prompt)
    for name, (prompt, expected) in HAND_CHECKED.items():
        if expected is not None:
            assert rules[name](prompt[1:-1]) == expected, name


def test_splits_disjoint_from_training():
    task = TASKS["first_last"]
    evaluation = sample_split(task, 100, seed=1)
    held_out = {prompt for prompt, _ in evaluation}
    stream = TrainingStream([task], held_out, seed=0)
    for _ in range(20):
        for prompt, _ in stream.batch(64):
            assert prompt not in held_out


def test_split_too_large_rejected():
    with pytest.raises(ValueError, match="too few distinct prompts"):
        sample_split(TASKS["sort"], 20000, seed=0)


def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ids = tokenizer("Fhello>")["input_ids"]
    assert ids == [tokenizer.bos_token_id, *encode("Fhello>")]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Fhello>"
    assert len(tokenizer) == len(vocabulary())


def test_collate_labels_answer_only():
    batch = collate([("Fab>", "ab"), ("Fabcd>", "ad")])
    labels = batch["labels"][0].tolist()
    assert labels[:5] == [-100] * 5
    assert labels[5:8] == [*encode("ab"), EOS_ID]
    assert batch["attention_mask"][0].tolist() == [1] * 8 + [0] * 2
