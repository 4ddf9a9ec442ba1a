"""The causal-LM family of the zoo: a Llama base, one full fine-tune per task, a LoRA run and an MoE.

The base is trained from scratch on the mixture of tasks with the pretraining separator `=` instead
of the task separator `>`, then for a few steps with `>`. It learns the skills but answers in the task
format only in part, like a pretrained model before fine-tuning. Every fine-tune starts from it and trains
gently on one task in the task format, so the fine-tunes stay near the base, and their task vectors
interfere the way those of real fine-tunes do. A base trained briefly on the task format instead
(undertrained rather than unaligned) gave merges no better than the base itself. Everything is written
with `save_pretrained` and loads with `AutoModelForCausalLM` and `AutoTokenizer`.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mergekit_plus.zoo.tasks import BOS_ID, EOS_ID, PAD_ID, PRETRAINING_SEPARATOR, TASKS, Task, encode, sample_split, save_tokenizer, vocabulary

Log = Callable[[str], None]
Example = tuple[str, str]


@dataclass(frozen=True)
class LMSettings:
    """Sizes, steps and learning rates of the causal-LM family; every field enters the zoo's settings hash."""

    tasks: tuple[str, ...]
    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    intermediate_size: int
    base_steps: int
    base_lr: float
    pretraining_rate: float
    alignment_steps: int
    alignment_lr: float
    fine_tune_steps: int
    fine_tune_lr: float
    batch_size: int
    eval_examples: int
    calibration_examples: int
    train_examples: int
    lora_task: str
    lora_rank: int
    lora_steps: int
    lora_lr: float
    lora_save_every: int
    moe_experts: int
    moe_top_k: int
    moe_intermediate_size: int
    moe_steps: int
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


# -- data -------------------------------------------------------------------------------------------

def held_out_splits(settings: LMSettings) -> dict[str, dict[str, list[Example]]]:
    """Draw the evaluation and calibration examples of every task; training never sees their prompts."""
    splits = {}
    for name in settings.tasks:
        task = TASKS[name]
        evaluation = sample_split(task, settings.eval_examples, seed=settings.seed + 1)
        calibration = sample_split(task, settings.calibration_examples, seed=settings.seed + 2,
                                   exclude={prompt for prompt, _ in evaluation})
        splits[name] = {"eval": evaluation, "calibration": calibration}
    return splits


def train_split(settings: LMSettings, name: str, held_out: set[str]) -> list[Example]:
    """Draw labelled examples of one task from its training distribution, for methods that learn from labels.

    The fine-tunes may have trained on these prompts, as on a task's train split. They stay out of
    `held_out`, so that adding this split leaves every model of the zoo as it was.
    """
    return sample_split(TASKS[name], settings.train_examples, seed=settings.seed + 3, exclude=held_out)


class TrainingStream:
    """Endless seeded training examples of some tasks, skipping every held-out prompt.

    With `pretraining_rate` above 0, that fraction of examples uses the pretraining separator instead
    of the task separator (see `PRETRAINING_SEPARATOR`).
    """

    def __init__(self, tasks: Sequence[Task], held_out: set[str], seed: int, *, pretraining_rate: float = 0.0) -> None:
        self.tasks = list(tasks)
        self.held_out = held_out
        self.rng = random.Random(seed)
        self.pretraining_rate = pretraining_rate

    def batch(self, size: int) -> list[Example]:
        examples = []
        while len(examples) < size:
            prompt, answer = self.rng.choice(self.tasks).example(self.rng)
            if prompt in self.held_out:
                continue
            if self.pretraining_rate and self.rng.random() < self.pretraining_rate:
                prompt = prompt[:-1] + PRETRAINING_SEPARATOR
            examples.append((prompt, answer))
        return examples


def collate(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """Right-padded input ids with labels on the answer and end-of-sequence tokens only."""
    rows = []
    for prompt, answer in examples:
        prompt_ids = [BOS_ID, *encode(prompt)]
        answer_ids = [*encode(answer), EOS_ID]
        rows.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (ids, targets) in enumerate(rows):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(ids)] = torch.tensor(targets)
        attention_mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


# -- models -----------------------------------------------------------------------------------------

def llama_config(settings: LMSettings):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(vocabulary()), hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size, num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads, num_key_value_heads=settings.kv_heads,
        max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )


def mixtral_config(settings: LMSettings):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=len(vocabulary()), hidden_size=settings.hidden_size,
        intermediate_size=settings.moe_intermediate_size, num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads, num_key_value_heads=settings.kv_heads,
        num_local_experts=settings.moe_experts, num_experts_per_tok=settings.moe_top_k,
        max_position_embeddings=64, tie_word_embeddings=False, output_router_logits=True,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )


def _learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 10 % of steps, then cosine decay to 10 % of the peak."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: torch.nn.Module, stream: TrainingStream, *, steps: int, lr: float, batch_size: int,
          on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train with AdamW on the answer tokens; return the loss of every step."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, steps, lr)
        output = model(**collate(stream.batch(batch_size)))
        loss = output.loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, prompts: Sequence[str], *, max_new_tokens: int = 4,
                   batch_size: int = 256) -> list[str]:
    """Decode greedily after each prompt, up to the end-of-sequence token.

    Prompts of equal length are batched together, so no padding (and no position-id care) is needed.
    """
    model.eval()
    by_length: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(index)
    answers = [""] * len(prompts)
    itos = vocabulary()
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            ids = torch.tensor([[BOS_ID, *encode(prompts[i])] for i in chunk])
            finished = torch.zeros(len(chunk), dtype=torch.bool)
            generated = []
            for _ in range(max_new_tokens):
                next_ids = model(input_ids=ids).logits[:, -1].argmax(-1)
                generated.append(torch.where(finished, PAD_ID, next_ids))
                finished |= next_ids == EOS_ID
                ids = torch.cat([ids, next_ids[:, None]], dim=1)
                if bool(finished.all()):
                    break
            tokens = torch.stack(generated, dim=1).tolist()
            for row, index in enumerate(chunk):
                text = []
                for token in tokens[row]:
                    if token in (EOS_ID, PAD_ID):
                        break
                    text.append(itos[token])
                answers[index] = "".join(text)
    return answers


def accuracy(model: torch.nn.Module, examples: Sequence[Example]) -> float:
    """Exact-match accuracy of greedy answers."""
    answers = greedy_answers(model, [prompt for prompt, _ in examples])
    return sum(got == expected for got, (_, expected) in zip(answers, examples)) / len(examples)


# -- the family -------------------------------------------------------------------------------------

def _save(model: torch.nn.Module, folder: Path) -> None:
    from transformers import GenerationConfig

    model.save_pretrained(folder)
    save_tokenizer(folder)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, max_new_tokens=4,
                     do_sample=False).save_pretrained(folder)


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def build_lm_family(folder: Path, settings: LMSettings, log: Log) -> dict:
    """Write base/, ft-<task>/, lora-<task>/checkpoint-N/, moe/ and data/ under `folder`; return the manifest.

    Paths in the manifest are relative to the zoo folder, `folder.parent`.
    """
    from transformers import LlamaForCausalLM, MixtralForCausalLM

    relative = folder.name
    tasks = [TASKS[name] for name in settings.tasks]
    splits = held_out_splits(settings)
    held_out = {prompt for split in splits.values() for examples in split.values() for prompt, _ in examples}
    evaluation = {name: split["eval"] for name, split in splits.items()}
    for name, split in splits.items():
        _write_jsonl(folder / "data" / name / "eval.jsonl",
                     [{"prompt": p, "answer": a} for p, a in split["eval"]])
        _write_jsonl(folder / "data" / name / "calibration.jsonl", [{"prompt": p} for p, _ in split["calibration"]])
        _write_jsonl(folder / "data" / name / "train.jsonl",
                     [{"prompt": p, "answer": a} for p, a in train_split(settings, name, held_out)])

    def scores(model: torch.nn.Module, names: Sequence[str]) -> dict[str, float]:
        return {name: accuracy(model, evaluation[name]) for name in names}

    # 1. The base, trained on the mixture of every task, mostly with the pretraining separator.
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    base = LlamaForCausalLM(llama_config(settings))
    train(base, TrainingStream(tasks, held_out, settings.seed, pretraining_rate=settings.pretraining_rate),
          steps=settings.base_steps, lr=settings.base_lr, batch_size=settings.batch_size)
    # A few steps on the task format give the base partial skill in it.
    train(base, TrainingStream(tasks, held_out, settings.seed + 7), steps=settings.alignment_steps,
          lr=settings.alignment_lr, batch_size=settings.batch_size)
    _save(base, folder / "base")
    base_scores = scores(base, settings.tasks)
    log(f"lm base: {_format_scores(base_scores)} ({time.perf_counter() - started:.0f} s)")
    base_state = {name: tensor.clone() for name, tensor in base.state_dict().items()}

    # 2. One full fine-tune per task, each from the base.
    fine_tunes, fine_tune_scores = {}, {}
    for index, task in enumerate(tasks):
        started = time.perf_counter()
        base.load_state_dict(base_state)
        torch.manual_seed(settings.seed + 100 + index)
        train(base, TrainingStream([task], held_out, settings.seed + 100 + index), steps=settings.fine_tune_steps,
              lr=settings.fine_tune_lr, batch_size=settings.batch_size)
        _save(base, folder / f"ft-{task.name}")
        fine_tunes[task.name] = f"{relative}/ft-{task.name}"
        fine_tune_scores[task.name] = scores(base, settings.tasks)
        log(f"lm ft-{task.name}: {_format_scores(fine_tune_scores[task.name])} "
            f"({time.perf_counter() - started:.0f} s)")
    base.load_state_dict(base_state)

    # 3. A LoRA run on one task, saving checkpoints with their training losses.
    lora = _build_lora_run(base, folder, settings, held_out, evaluation[settings.lora_task], log)

    # 4. The MoE variant, trained on the mixture like the base.
    started = time.perf_counter()
    torch.manual_seed(settings.seed + 300)
    moe = MixtralForCausalLM(mixtral_config(settings))
    # The MoE learns the task format itself, so that its accuracy shows what expert merging costs.
    train(moe, TrainingStream(tasks, held_out, settings.seed + 300), steps=settings.moe_steps, lr=settings.base_lr,
          batch_size=settings.batch_size)
    _save(moe, folder / "moe")
    moe_scores = scores(moe, settings.tasks)
    log(f"lm moe: {_format_scores(moe_scores)} ({time.perf_counter() - started:.0f} s)")

    return {
        "kind": "causal-lm",
        "tasks": list(settings.tasks),
        "descriptions": {task.name: task.description for task in tasks},
        "base": f"{relative}/base",
        "fine_tunes": fine_tunes,
        "lora": lora,
        "moe": f"{relative}/moe",
        "eval_data": {name: f"{relative}/data/{name}/eval.jsonl" for name in settings.tasks},
        "calibration_data": {name: f"{relative}/data/{name}/calibration.jsonl" for name in settings.tasks},
        "train_data": {name: f"{relative}/data/{name}/train.jsonl" for name in settings.tasks},
        "accuracy": {
            "base": base_scores,
            "fine_tunes": {name: fine_tune_scores[name][name] for name in settings.tasks},
            "fine_tunes_all_tasks": fine_tune_scores,
            "moe": moe_scores,
        },
    }


def _build_lora_run(base: torch.nn.Module, folder: Path, settings: LMSettings, held_out: set[str],
                    evaluation: list[Example], log: Log) -> dict:
    from peft import LoraConfig, get_peft_model

    started = time.perf_counter()
    task = TASKS[settings.lora_task]
    run_folder = folder / f"lora-{task.name}"
    torch.manual_seed(settings.seed + 200)
    config = LoraConfig(r=settings.lora_rank, lora_alpha=2 * settings.lora_rank, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    with warnings.catch_warnings():
        # peft 0.21 calls a transformers method that transformers 5 deprecates; nothing to act on here.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(base, config)
    history: list[dict] = []
    window: list[float] = []
    checkpoints = []

    def on_step(step: int, loss: float) -> None:
        window.append(loss)
        if step % settings.lora_save_every and step != settings.lora_steps:
            return
        history.append({"step": step, "loss": round(sum(window) / len(window), 6),
                        "learning_rate": _learning_rate(step - 1, settings.lora_steps, settings.lora_lr)})
        window.clear()
        target = run_folder / f"checkpoint-{step}"
        model.save_pretrained(target)
        _normalise_adapter_config(target)
        state = {"global_step": step, "max_steps": settings.lora_steps, "logging_steps": settings.lora_save_every,
                 "train_batch_size": settings.batch_size, "log_history": list(history)}
        (target / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        checkpoints.append(f"{folder.name}/lora-{task.name}/checkpoint-{step}")
        model.train()

    train(model, TrainingStream([task], held_out, settings.seed + 200), steps=settings.lora_steps,
          lr=settings.lora_lr, batch_size=settings.batch_size, on_step=on_step)
    final_accuracy = accuracy(model, evaluation)
    model.unload()
    log(f"lm lora-{task.name}: {len(checkpoints)} checkpoints, final {final_accuracy:.2f} "
        f"({time.perf_counter() - started:.0f} s)")
    return {"task": task.name, "base": f"{folder.name}/base", "checkpoints": checkpoints,
            "final_accuracy": final_accuracy}


def _normalise_adapter_config(folder: Path) -> None:
    """Point the adapter at the zoo's base by a relative path and sort its module list.

    Both keep builds in different folders and processes byte-identical. peft keeps the modules in a
    set, whose order follows Python's per-process string hashing.
    """
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = "../../base"
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _format_scores(scores: dict[str, float]) -> str:
    return " ".join(f"{name}={value:.2f}" for name, value in scores.items())
