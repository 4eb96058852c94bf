"""The humor classifier the rewards stage trains (no packaged humor model exists): MiniLM
sentence embeddings and a logistic regression, jokes as positives and plain answers as
negatives, stored as safetensors (nothing pickled). `HumorReward` (llm/rewards.py) scores with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from palm_tasks.llm.embeddings import EMBEDDING_MODEL_NAME, embed

HUMOR_RECIPE_VERSION = "humor-clf-v1"  # bump when the humor training data or recipe changes
HUMOR_WEIGHTS_FILE = "classifier.safetensors"
HUMOR_META_FILE = "meta.json"
FORTUNES_DIR = Path("/usr/share/games/fortunes")


def _chatterbot_english() -> Path:
    from palm_tasks.llm.prompts import package_dir

    return package_dir("chatterbot_corpus") / "data" / "english"


# humor.yml answers to "Tell me a joke" that are not jokes
_HUMOR_YML_NON_JOKES = ("I'm a not a comedian. Why don't you check out a joke?",)


def humor_training_texts(fortunes_dir: Path = FORTUNES_DIR) -> tuple[dict[str, list[str]], list[str]]:
    """Positives by source and the pool of plain (negative) answers, deduplicated.

    Positives: pyjokes one-liners (English, all categories); chatterbot humor.yml answers to
    "Tell me a joke" (minus the non-jokes); Debian fortunes of <= 200 characters if
    ``fortunes_dir`` exists (optional; at most as many as pyjokes so they do not dominate).
    Negatives: answers of >= 4 words from every other chatterbot category.
    """
    import pyjokes

    positives = {"pyjokes": [" ".join(j.split()) for j in pyjokes.get_jokes(language="en", category="all")]}
    humor = yaml.safe_load((_chatterbot_english() / "humor.yml").read_text(encoding="utf-8"))
    positives["chatterbot_humor"] = [
        " ".join(answer.split())
        for question, *answers in humor["conversations"]
        if question.strip().lower() == "tell me a joke"
        for answer in answers
        if " ".join(answer.split()) not in _HUMOR_YML_NON_JOKES
    ]
    positives["fortunes"] = _fortunes(fortunes_dir, limit=len(positives["pyjokes"]))

    negatives = []
    for path in sorted(_chatterbot_english().glob("*.yml")):
        if path.stem == "humor":
            continue
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in data.get("conversations") or []:
            negatives += [" ".join(a.split()) for a in conversation[1::2] if isinstance(a, str)]
    negatives = [a for a in negatives if len(a.split()) >= 4]

    seen: set[str] = set()
    positives = {src: _unseen(texts, seen) for src, texts in positives.items()}
    return positives, _unseen(negatives, seen)


def _unseen(texts: list[str], seen: set[str]) -> list[str]:
    kept = []
    for text in texts:
        if text and text.lower() not in seen:
            seen.add(text.lower())
            kept.append(text)
    return kept


def _fortunes(fortunes_dir: Path, limit: int) -> list[str]:
    """Short fortunes (plain files, '%'-separated; offensive 'off/' subdirectory skipped)."""
    if not Path(fortunes_dir).is_dir():
        return []
    texts = []
    for path in sorted(Path(fortunes_dir).iterdir()):
        if path.is_file() and not path.is_symlink() and path.suffix not in (".dat", ".u8"):
            for entry in path.read_text(encoding="utf-8", errors="ignore").split("\n%\n"):
                entry = " ".join(entry.strip("%\n ").split())
                if 20 <= len(entry) <= 200:
                    texts.append(entry)
    if len(texts) > limit:
        keep = np.sort(np.random.default_rng(0).choice(len(texts), size=limit, replace=False))
        texts = [texts[i] for i in keep]
    return texts


def train_humor_classifier(out_dir: Path, seed: int, test_fraction: float,
                           fortunes_dir: Path = FORTUNES_DIR) -> dict:
    """Train the joke classifier; write out_dir/classifier.safetensors + meta.json.

    Classes are balanced by subsampling the larger one (seeded); a stratified held-out split
    of ``test_fraction`` measures accuracy. Only numpy arrays (coef, intercept) are saved, as
    safetensors: nothing is pickled. Returns the metadata (held-out accuracy, sizes, seed...).
    """
    from safetensors.numpy import save_file
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    positives_by_source, negatives = humor_training_texts(fortunes_dir)
    positives = [t for texts in positives_by_source.values() for t in texts]
    negatives_available = len(negatives)
    rng = np.random.default_rng(seed)
    n_per_class = min(len(positives), len(negatives))
    positives = [positives[i] for i in np.sort(rng.choice(len(positives), n_per_class, replace=False))]
    negatives = [negatives[i] for i in np.sort(rng.choice(len(negatives), n_per_class, replace=False))]
    texts = positives + negatives
    labels = np.array([1] * n_per_class + [0] * n_per_class)

    x_train, x_test, y_train, y_test = train_test_split(
        embed(texts), labels, test_size=test_fraction, stratify=labels, random_state=seed
    )
    classifier = LogisticRegression(C=1.0, max_iter=2000).fit(x_train, y_train)
    heldout_accuracy = float(classifier.score(x_test, y_test))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(
        {"coef": classifier.coef_.reshape(-1).astype(np.float64),
         "intercept": classifier.intercept_.reshape(1).astype(np.float64)},
        str(out_dir / HUMOR_WEIGHTS_FILE),
    )
    meta = {
        "recipe_version": HUMOR_RECIPE_VERSION,
        "seed": seed,
        "embedding_model": EMBEDDING_MODEL_NAME,
        "heldout_accuracy": heldout_accuracy,
        "train_accuracy": float(classifier.score(x_train, y_train)),
        "n_train": int(len(y_train)),
        "n_test": int(len(y_test)),
        "n_per_class": int(n_per_class),
        "positives_available": {src: len(t) for src, t in positives_by_source.items()},
        "negatives_available": negatives_available,
        "test_fraction": test_fraction,
    }
    (out_dir / HUMOR_META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def current_classifier(humor_dir: Path, seed: int, test_fraction: float) -> dict | None:
    try:
        meta = json.loads((humor_dir / HUMOR_META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (meta.get("recipe_version") == HUMOR_RECIPE_VERSION and meta.get("seed") == seed
            and meta.get("test_fraction") == test_fraction and (humor_dir / HUMOR_WEIGHTS_FILE).is_file()):
        return meta
    return None
