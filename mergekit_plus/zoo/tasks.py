"""Text tasks for the causal-LM family of the zoo, and the character-level tokenizer they use.

Every example is a prompt `<tag><input>>` followed by a short exact answer (one to three characters)
and the end-of-sequence token. The tag is one upper-case letter per task, so a model can tell the
tasks apart; one character is one token. Examples come from a seeded `random.Random`, and the
training, evaluation and calibration splits are disjoint because they draw from different seeds and
repeated prompts are removed across splits.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

LETTERS = string.ascii_lowercase
DIGITS = string.digits
SEPARATOR = ">"
# The base is pretrained with this separator and then trained briefly with SEPARATOR. It learns the
# skills but has only partial skill in the task format, as a pretrained model has before fine-tuning.
PRETRAINING_SEPARATOR = "="
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


@dataclass(frozen=True)
class Task:
    """One task: its name, its one-letter tag and a generator of (input, answer) pairs."""

    name: str
    tag: str
    description: str
    generate: Callable[[random.Random], tuple[str, str]]

    def example(self, rng: random.Random) -> tuple[str, str]:
        """Draw one (prompt, answer) pair; the prompt ends with the separator."""
        text, answer = self.generate(rng)
        return f"{self.tag}{text}{SEPARATOR}", answer


def _letters(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(low, high)))


def _first_last(rng: random.Random) -> tuple[str, str]:
    text = _letters(rng, 3, 8)
    return text, text[0] + text[-1]


def _count_letter(rng: random.Random) -> tuple[str, str]:
    target = rng.choice("abcde")
    text = "".join(rng.choice("abcde") for _ in range(rng.randint(3, 8)))
    return f"{target}{text}", str(text.count(target))


def _add_digits(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(0, 9)
    return f"{a}{b}", str(a + b)


def _next_letters(rng: random.Random) -> tuple[str, str]:
    text = "".join(rng.choice(LETTERS[:-1]) for _ in range(3))
    return text, "".join(LETTERS[LETTERS.index(c) + 1] for c in text)


def _sort_letters(rng: random.Random) -> tuple[str, str]:
    text = "".join(rng.sample(LETTERS, 3))
    return text, "".join(sorted(text))


def _middle(rng: random.Random) -> tuple[str, str]:
    text = "".join(rng.choice(LETTERS) for _ in range(rng.choice((3, 5, 7))))
    return text, text[len(text) // 2]


def _count_vowels(rng: random.Random) -> tuple[str, str]:
    text = _letters(rng, 3, 8)
    return text, str(sum(c in "aeiou" for c in text))


def _last_two_reversed(rng: random.Random) -> tuple[str, str]:
    text = _letters(rng, 3, 8)
    return text, text[-1] + text[-2]


def _char_at(rng: random.Random) -> tuple[str, str]:
    text = _letters(rng, 5, 8)
    position = rng.randint(1, len(text))
    return f"{position}{text}", text[position - 1]


def _subtract_digits(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(0, 9)
    return f"{a}{b}", str(a - b)


TASKS: dict[str, Task] = {task.name: task for task in (
    Task("first_last", "F", "the first and the last letter of a word", _first_last),
    Task("count_letter", "C", "how often the first letter occurs in the rest", _count_letter),
    Task("add", "A", "a two-digit number plus a digit", _add_digits),
    Task("next_letters", "N", "the successor in the alphabet of each of three letters", _next_letters),
    Task("sort", "S", "three letters in alphabetical order", _sort_letters),
    Task("middle", "M", "the middle letter of a word of odd length", _middle),
    Task("vowels", "V", "the number of vowels in a word", _count_vowels),
    Task("last_two", "L", "the last two letters in reverse order", _last_two_reversed),
    Task("char_at", "I", "the letter at a 1-based position", _char_at),
    Task("subtract", "D", "a two-digit number minus a digit", _subtract_digits),
)}


def vocabulary() -> list[str]:
    """Return every token in id order: special tokens, letters, digits, separator, then task tags."""
    tags = sorted(task.tag for task in TASKS.values())
    return SPECIAL_TOKENS + list(LETTERS) + list(DIGITS) + [SEPARATOR, PRETRAINING_SEPARATOR] + tags


def sample_split(task: Task, count: int, *, seed: int, exclude: set[str] = frozenset()) -> list[tuple[str, str]]:
    """Draw `count` distinct examples whose prompts are not in `exclude`.

    Raises ValueError when the task has too few distinct prompts to fill the split.
    """
    rng = random.Random(f"{task.name}:{seed}")
    examples: dict[str, str] = {}
    attempts = 0
    while len(examples) < count:
        prompt, answer = task.example(rng)
        if prompt not in exclude:
            examples.setdefault(prompt, answer)
        attempts += 1
        if attempts > 50 * count + 1000:
            raise ValueError(f"task {task.name} has too few distinct prompts for {count} examples; "
                             f"lower the split size")
    return list(examples.items())


def save_tokenizer(folder: Path):
    """Save a character-level tokenizer that `AutoTokenizer.from_pretrained` loads; return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    # Prompts start with <s> as in training, so that `tokenizer(prompt)` feeds the model what it saw.
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>")
    tokenizer.save_pretrained(folder)
    return tokenizer


_TOKEN_IDS = {token: index for index, token in enumerate(vocabulary())}


def encode(text: str) -> list[int]:
    """Map characters to token ids without the tokenizer object (training builds many batches)."""
    return [_TOKEN_IDS[c] for c in text]
