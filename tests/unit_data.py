"""A tiny offline data folder for the unit tier: a few made-up rows per benchmark in the
schema of the stock split, a few made-up corpus documents, and a SHA256SUMS, so the unit
tests need neither the shared data folder nor a network pull.

The rows only have to be well formed: the unit tests check settings, schemas and signatures,
not accuracies (those run on the real splits in the integration tier).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

ARC = [
    {"id": f"u{i}", "question": q, "choices": {"text": c, "label": ["A", "B", "C", "D"]}, "answerKey": a}
    for i, (q, c, a) in enumerate(
        [
            ("What do plants need to make food?", ["sunlight", "sand", "noise", "plastic"], "A"),
            ("Which of these is a liquid at room temperature?", ["iron", "water", "salt", "wood"], "B"),
            ("What force pulls objects toward the ground?", ["magnetism", "friction", "gravity", "wind"], "C"),
            ("Which animal lays eggs?", ["dog", "cat", "horse", "chicken"], "D"),
            ("What is the main source of heat for Earth?", ["the Sun", "the Moon", "volcanoes", "lightning"], "A"),
            ("Which tool measures temperature?", ["ruler", "thermometer", "scale", "compass"], "B"),
        ]
    )
]
HELLASWAG = [
    {
        "ind": i,
        "activity_label": label,
        "ctx_a": a,
        "ctx_b": b,
        "ctx": f"{a} {b}",
        "endings": endings,
        "source_id": f"unit-{i}",
        "split": "val",
        "split_type": "indomain",
        "label": str(gold),
    }
    for i, (label, a, b, endings, gold) in enumerate(
        [
            (
                "Cooking",
                "A man cracks two eggs into a bowl.",
                "he",
                ["whisks them with a fork.", "throws the bowl away.", "paints the wall.", "sings to a cat."],
                0,
            ),
            (
                "Running",
                "A woman ties her shoes at the track.",
                "she",
                ["eats a sandwich.", "starts jogging around the lane.", "reads a map.", "falls asleep."],
                1,
            ),
            (
                "Gardening",
                "A child digs a small hole in the soil.",
                "the child",
                ["drives a car.", "opens a laptop.", "drops a seed into it.", "swims away."],
                2,
            ),
            (
                "Painting",
                "A man dips a brush into blue paint.",
                "he",
                ["boils water.", "locks the door.", "jumps rope.", "strokes it across the canvas."],
                3,
            ),
        ]
    )
]
WINOGRANDE = [
    {"sentence": s, "option1": o1, "option2": o2, "answer": a}
    for s, o1, o2, a in [
        ("The trophy did not fit in the suitcase because the _ was too big.", "trophy", "suitcase", "1"),
        ("The trophy did not fit in the suitcase because the _ was too small.", "trophy", "suitcase", "2"),
        ("Anna gave Maria a book because _ had finished reading it.", "Anna", "Maria", "1"),
        ("The cup fell off the table because the _ was wobbly.", "cup", "table", "2"),
    ]
]
LAMBADA = [
    {"text": t}
    for t in [
        "She opened the old box and found a letter from her grandmother. She read the letter twice",
        "The dog waited by the door every evening until his owner came home. When the door opened he wagged his tail",
        "He planted the tree when his son was born. Thirty years later they sat together under the tree",
        "The baker woke at four to light the oven. By six the whole street smelled of bread",
    ]
]
CORPUS = {
    "corpus/tinystories_sample.jsonl": "Once upon a time a little {animal} named {name} lived near a {place}. "
    "Every day {name} looked for {thing}. One day {name} found it and was happy.",
    "corpus/wikipedia_sample.jsonl": "{name} River\n{name} River is a river in the {place} region. It is known for "
    "its {thing} and the {animal}s that live along its banks.",
    "corpus/c4_sample.jsonl": "Visit the {name} {place} shop for the best {thing} in town. Our {animal} friendly "
    "staff are open every day.",
}
ANIMALS, NAMES = ["cat", "fox", "owl", "frog", "bear"], ["Tom", "Lily", "Max", "Ruby", "Sam", "Mia", "Leo", "Zoe"]
PLACES, THINGS = ["forest", "lake", "hill", "farm", "river", "town"], ["berries", "shells", "stones", "flowers"]
DOCS_PER_SOURCE = 48


def write_unit_data(folder: Path) -> Path:
    """Write the folder (benchmarks/, corpus/, SHA256SUMS) and return it."""
    files = {
        "benchmarks/arc_easy/test.jsonl": ARC,
        "benchmarks/hellaswag/validation.jsonl": HELLASWAG,
        "benchmarks/winogrande/validation.jsonl": WINOGRANDE,
        "benchmarks/lambada_openai/test.jsonl": LAMBADA,
    }
    for rel, template in CORPUS.items():
        files[rel] = [
            {
                "text": template.format(
                    animal=ANIMALS[i % 5], name=NAMES[i % 8], place=PLACES[i % 6], thing=THINGS[i % 4]
                )
            }
            for i in range(DOCS_PER_SOURCE)
        ]
    sums = []
    for rel, rows in sorted(files.items()):
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        sums.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {rel}\n")
    (folder / "SHA256SUMS").write_text("".join(sums))
    return folder


def tiny_distillation_inputs(root: Path, **distill: object) -> tuple:
    """A tiny teacher, its student with layer 3 removed, a 12-document corpus, 8-sample settings
    (``distill`` overrides them) and the tokens: (base, pruned, cfg, tokens)."""
    from tailor.config.settings import DataConfig, DistillConfig, ModelConfig, PruneConfig
    from tailor.data.tokenised import tokenise_corpus
    from tailor.models.sources import materialize
    from tailor.prune.pruning import prune_checkpoint

    data = root / "data"
    (data / "corpus").mkdir(parents=True)
    (data / "corpus" / "c.jsonl").write_text(
        "".join(f'{{"text": "document {i} about cats and dogs"}}\n' for i in range(12))
    )
    base = materialize(ModelConfig(source="tiny"), str(root))
    pruned = prune_checkpoint(base, [3], str(root))[0]
    settings = dict(
        corpus_mix={"corpus/c.jsonl": 1},
        heldout_docs=2,
        num_samples=8,
        batch_size=4,
        grad_accum=1,
        seq_len=16,
        epochs=1,
        learning_rate=1e-3,
    )
    cfg = DistillConfig(**{**settings, **distill})
    tokens = tokenise_corpus(
        base, cfg, PruneConfig(calibration_samples=4, calibration_seq_len=8), DataConfig(data_dir=str(data)), root
    )
    return base, pruned, cfg, tokens
