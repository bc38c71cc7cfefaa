"""The offline default: a tiny Llama-architecture model and generated data in the seed tasks' schemas.

Nothing here downloads anything. ``make_tiny_model`` trains a byte-level BPE tokenizer on the task
texts, gives it a Llama-3-style chat template and special tokens, and saves a randomly initialised
``LlamaForCausalLM`` in Hugging Face format, so every later step uses the ordinary loading code.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

import datasets

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|finetune_right_pad_id|>"]
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


MODEL_VERSION = 2  # raise when make_tiny_model builds a different model: the demo then builds its model again


def make_tiny_model(
    out_dir: Path, texts: list[str], *, vocab_size: int = 4096, hidden: int = 128, layers: int = 4, pretrain_steps: int = 300, seed: int = 0
) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>"
    )
    tok.chat_template = LLAMA3_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=_multiple_of(hidden * 8 // 3, 32), num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    # Wider token embeddings than the default 0.02: the tied output head must reach logits large enough
    # for a confident prediction, and adapters never train it (a real checkpoint's head is trained).
    torch.nn.init.normal_(model.model.embed_tokens.weight, std=0.1)
    if pretrain_steps:
        pretrain(model, tok, texts, pretrain_steps, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def _multiple_of(n: int, k: int) -> int:
    """n rounded up to a multiple of k. bitsandbytes 0.50 repacks 4-bit weights for inference on CPUs with
    AVX512-BF16 and asserts that every quantised layer's output size is a multiple of 32; real models'
    are (Llama 3: 14336), a 64-wide tiny model's 170 was not, so QLoRA evaluation failed on those CPUs."""
    return -(-n // k) * k


def pretrain(model, tok, texts: list[str], steps: int, seed: int, batch_size: int = 32, lr: float = 1e-3) -> float:
    """A short language-model pass over the raw task texts (no chat format, no labels), so that the tiny
    model is a "base model" with a vocabulary it knows, as real checkpoints are; adapters on a randomly
    initialised model cannot move its near-uniform output distribution. A plain loop on purpose: this
    builds a fixture model, it is not the project's training path. Returns the final loss.
    """
    import torch
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    model.train()
    loss = torch.tensor(0.0)
    for _ in tqdm(range(steps), desc="pretraining tiny model", unit="step"):
        batch = tok([tok.bos_token + t + tok.eos_token for t in rng.sample(texts, min(batch_size, len(texts)))],
                    add_special_tokens=False, padding=True, truncation=True, max_length=128, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    model.eval()
    return loss.item()


# ------------------------------------------------------------------ synthetic data in the seed schemas

_CLAIM = [
    "My car was rear-ended at a traffic light and the bumper is crushed. I want to file a claim.",
    "A pipe burst in the kitchen and flooded the floor; please start a claim for the water damage.",
    "Someone broke into my house last night and stole my laptop, I need to report a claim.",
    "Hail dented the roof of my car during the storm, how do I claim the repair?",
    "I slipped at work and broke my wrist, I am submitting a claim for the medical bills.",
    "A tree fell on my garage in the storm and I would like to claim for the damage.",
    "My phone was stolen on the train and I want to claim it under my policy.",
    "The fire in the apartment below damaged my ceiling, I am filing a claim.",
]
_NOT_CLAIM = [
    "How do I update the mailing address on my policy?",
    "What is the premium for adding a second driver?",
    "Can you send me a copy of my policy documents?",
    "I want to compare prices for a family health plan.",
    "When is my next payment due?",
    "The website login page keeps timing out.",
    "Do you offer discounts for installing a home alarm?",
    "Please change the email address on my account.",
]
_OPENERS = ["", "Hi, ", "Hello. ", "Quick question: ", "Please help, "]
_CLOSERS = ["", " Thanks.", " Thank you!", " Any advice?", " Regards."]

_FACTS = [  # (question, answer) for the commonsense-style multiple choice
    ("Where would you keep milk cold?", "refrigerator"), ("Where do you borrow books?", "library"),
    ("Where do you park a car at home?", "garage"), ("What do you use to cut paper?", "scissors"),
    ("Where do fish live?", "water"), ("What do you wear on your feet?", "shoes"),
    ("Where do you sleep at night?", "bed"), ("What do you use to write on a blackboard?", "chalk"),
    ("Where do you buy bread?", "bakery"), ("What falls from clouds?", "rain"),
    ("What do you use to open a locked door?", "key"), ("Where do planes take off?", "airport"),
    ("What do bees make?", "honey"), ("Where would you see many trees?", "forest"),
    ("What do you drink when thirsty?", "water"), ("What keeps you dry in the rain?", "umbrella"),
]
# A sentence that states each fact, put before the question in the demo's data (``mc_context``): the model
# then finds the choice that the sentence names and answers its letter, a reading task a tiny model learns
# within the demo's budget; recalling the fact and pointing at its letter at once stayed at chance.
_CONTEXT = {
    "refrigerator": "Milk stays cold in the refrigerator.", "library": "People borrow books from the library.",
    "garage": "The car is parked in the garage.", "scissors": "Paper is cut with scissors.",
    "water": "Fish live in water and people drink water.", "shoes": "You wear shoes on your feet.",
    "bed": "At night you sleep in a bed.", "chalk": "You write on a blackboard with chalk.", "bakery": "Bread is sold at the bakery.",
    "rain": "Rain falls from the clouds.", "key": "A key opens a locked door.", "airport": "Planes take off at the airport.",
    "honey": "Bees make honey.", "forest": "A forest has many trees.", "umbrella": "An umbrella keeps you dry.",
}
_DISTRACT = ["desk", "ocean", "candle", "mountain", "spoon", "pillow", "window", "carpet", "ladder", "wallet", "mirror", "bucket"]
_CHAT = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What colour is the sky on a clear day?", "The sky is blue on a clear day."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What do cows drink?", "Cows drink water."),
]


def _intent_text(intent: str, rng: random.Random) -> str:
    words = intent.replace("_", " ").rstrip("?")
    forms = [f"I have a problem with {words}.", f"Can you help me with {words}?", f"Question about {words} please.", f"{words} - what should I do?"]
    return rng.choice(_OPENERS) + rng.choice(forms) + rng.choice(_CLOSERS)


def synthetic_datasets(out_dir: Path, *, per_class: int = 40, seed: int = 0, banking_labels: list[str] | None = None,
                       mc_context: bool = False) -> dict[str, Path]:
    """Write four small local datasets, in the seed tasks' schemas, that the demo config points at
    (``mc_context``: each multiple-choice question follows a sentence stating its fact)."""
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    paths = {}
    claims = [{"text": rng.choice(_OPENERS) + rng.choice(pool) + rng.choice(_CLOSERS), "label": label}
              for _ in range(per_class * 3) for label, pool in (("Claim", _CLAIM), ("Not a Claim", _NOT_CLAIM))]
    paths["claims"] = _write(out_dir / "claims", claims)

    names = banking_labels or BANKING_SAMPLE
    rows = [{"text": _intent_text(n, rng), "label": i} for i, n in enumerate(names) for _ in range(per_class)]
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    paths["banking77"] = _write(out_dir / "banking77", rows, features)

    qa = []
    for i in range(per_class * 10):
        question, answer = _FACTS[i % len(_FACTS)]
        options = rng.sample([d for d in _DISTRACT if d != answer], 4) + [answer]
        rng.shuffle(options)
        question = f"{_CONTEXT[answer]} {question}" if mc_context else question
        qa.append({"id": f"q{i}", "question": question, "question_concept": answer,
                   "choices": {"label": list("ABCDE"), "text": options}, "answerKey": "ABCDE"[options.index(answer)]})
    paths["commonsense_qa"] = _write(out_dir / "commonsense_qa", qa)

    chat = [{"messages": [{"role": "user", "content": rng.choice(_OPENERS) + q}, {"role": "assistant", "content": a}]}
            for _ in range(per_class) for q, a in _CHAT]
    paths["chat"] = _write(out_dir / "chat", chat)
    return paths


def _write(folder: Path, rows: list[dict], features: datasets.Features | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(folder / "train.parquet"))
    return folder


def corpus(paths: dict[str, Path]) -> list[str]:
    """Every string in the generated datasets: the tokenizer's training text."""
    texts: list[str] = []
    for folder in paths.values():
        ds = datasets.load_dataset(str(folder), split="train")
        texts += dataset_texts(ds)
    return texts


def training_texts(cfg) -> list[str]:
    """Every string of the training rows of the split a run with ``cfg`` makes (deterministic: `train` makes
    the same one), never its validation rows, so that scores on the validation rows stay fair."""
    from multitune.data.load import load_tasks
    from multitune.hub import mirror_root

    texts: list[str] = []
    for td in load_tasks(cfg, None, create=True):
        rows = td.task.load(mirror_root(cfg.hub_mirror), cfg.data.drop_unlabelled).select(td.split["train"])
        texts += dataset_texts(rows, td.task.label_names)
    return texts


def dataset_texts(ds: datasets.Dataset, extra: Iterable[str] = ()) -> list[str]:
    """Every string in a dataset, plus its ClassLabel names (a real model knows its label words too)."""
    texts = [t for row in ds for t in _strings(row)]
    for feature in ds.features.values():
        if isinstance(feature, datasets.ClassLabel):
            texts += [n.replace("_", " ") for n in feature.names] + list(feature.names)
    return texts + list(extra)


def _strings(value) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


BANKING_SAMPLE = [
    "activate_my_card", "card_arrival", "card_not_working", "change_pin", "compromised_card",
    "declined_card_payment", "exchange_rate", "lost_or_stolen_card", "pending_transfer", "request_refund",
    "top_up_failed", "transfer_fee_charged",
]
