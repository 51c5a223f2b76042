"""Build MiniMind-Tiny's training dialogues: hand-written Q&A from ``corpus/*.jsonl`` plus templated chats.

The templated part is the memory demo ("My name is X." ... "What is my name?", "我叫X。" ... "我叫什么名字？")
with many random names, so the model learns to copy a name from the context instead of memorising names.
Everything is drawn from one seeded ``random.Random``: the same seed gives the same corpus.

    python -m minimind_course.training.corpus --out corpus.jsonl --seed 0 --examples 2000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from minimind_course.paths import CORPUS_DIR


# The memory demo, exactly as the course notebooks and eval use it.
EN_INTRO = "My name is {name}."
EN_GREET = "Nice to meet you, {name}! How can I help you today?"
EN_ASK = "What is my name?"
EN_RECALL = "Your name is {name}."
EN_DONT_KNOW = "I don't know your name yet. Tell me your name and I will remember it during this chat."
ZH_INTRO = "我叫{name}。"
ZH_GREET = "你好，{name}！很高兴认识你。有什么可以帮你的吗？"
ZH_ASK = "我叫什么名字？"
ZH_RECALL = "你叫{name}。"
ZH_DONT_KNOW = "我还不知道你的名字。告诉我你的名字，我会在这次对话中记住它。"

# Less frequent ways to say the same thing, so the demo survives small wording changes.
EN_INTRO_VARIANTS = ["Hi, my name is {name}.", "Hello! My name is {name}.", "My name is {name}", "I am {name}."]
EN_ASK_VARIANTS = ["What's my name?", "Do you know my name?", "What is my name", "Do you remember my name?"]
ZH_INTRO_VARIANTS = ["你好，我叫{name}。", "我的名字是{name}。", "我叫{name}", "我是{name}。"]
ZH_ASK_VARIANTS = ["我的名字是什么？", "你知道我叫什么吗？", "我叫什么名字", "你还记得我的名字吗？"]

EN_REPEAT = ["Repeat after me: {text}", "Please repeat: {text}", "Say this back to me: {text}"]
ZH_REPEAT = ["请跟我说：{text}", "请重复：{text}", "跟我念：{text}"]

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are MiniMind-Tiny, a small assistant for the minimind-course.",
    "You are a friendly assistant. Answer briefly.",
    "Answer the user's questions about the course.",
    "你是一个有用的助手。",
    "你是 MiniMind-Tiny，一个课程助手。",
    "请简洁地回答用户的问题。",
]

EN_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwyz" for v in "aeiou"] + ["th", "sh", "ch", "an", "el", "or", "in"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
CJK_RANGE = (0x4E00, 0x9FA5)
MEMORY_SHARE = 0.7  # of the dialogues; copying names needs far more practice than memorising fixed answers
REPEAT_SHARE_EARLY, REPEAT_EARLY_UNTIL, REPEAT_SHARE = 0.3, 0.2, 0.1  # copy drills: more at first, then a tenth


def common_chinese_chars() -> str:
    """The 3,755 commonly used characters of GB2312 level 1 (rows 0xB0-0xD7), decoded from their codes."""
    chars = []
    for code in range(0xB0A1, 0xD7FF):
        try:
            chars.append(bytes([code >> 8, code & 0xFF]).decode("gb2312"))
        except UnicodeDecodeError:  # the unused cells of a row
            pass
    return "".join(chars)


COMMON_CHARS = common_chinese_chars()


def load_jsonl(name: str) -> list[dict]:
    """Read one hand-written corpus file (one JSON object per line)."""
    with open(CORPUS_DIR / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_json(name: str) -> dict:
    with open(CORPUS_DIR / name, encoding="utf-8") as f:
        return json.load(f)


def qa_pairs(groups: Sequence[dict], lang: str) -> list[tuple[str, str]]:
    """Every (question, answer) pair of one language in paraphrase groups."""
    return [(q, g[lang]["a"]) for g in groups for q in g[lang]["q"]]


@dataclass
class NameSampler:
    """Random names for the memory demo: real names, names built from tokenizer pieces, letters, syllables."""

    rng: random.Random
    names: dict
    excluded: frozenset[str]
    pieces: Sequence[str] = ()

    def english(self) -> str:
        while self._is_excluded(name := self._english()):
            pass
        return name

    def chinese(self) -> str:
        while self._is_excluded(name := self._chinese()):
            pass
        return name

    def _is_excluded(self, name: str) -> bool:
        """Held-out names stay unseen, also inside longer names ("Kenji" in "Kenjiro")."""
        return any(held in name for held in self.excluded)

    def _english(self) -> str:
        r, rng = self.rng.random(), self.rng
        if r < 0.2:
            return rng.choice(self.names["en_first"])
        if r < 0.25:
            return f"{rng.choice(self.names['en_first'])} {rng.choice(self.names['en_last'])}"
        if r < 0.7 and self.pieces:  # every sub-word must be copied often (tiny-model-notes lesson 2)
            word = "".join(rng.choice(self.pieces) for _ in range(rng.randint(1, 4)))
            return word[:1].upper() + word[1:]
        if r < 0.8:
            word = "".join(rng.choice(EN_SYLLABLES) for _ in range(rng.randint(2, 4)))
            return word.capitalize()
        if r < 0.92:
            word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 9)))
            return word.capitalize()
        return self._chinese()  # a Chinese name inside an English sentence

    def _chinese(self) -> str:
        r, rng = self.rng.random(), self.rng
        given = self.names["zh_given_chars"]
        if r < 0.5:
            return rng.choice(self.names["zh_surnames"]) + "".join(rng.choice(given) for _ in range(rng.randint(1, 2)))
        if r < 0.8:  # any common character: most are 2-3 byte-level tokens, which must be copied exactly too
            surname = rng.choice(self.names["zh_surnames"]) if rng.random() < 0.5 else ""
            return surname + "".join(rng.choice(COMMON_CHARS) for _ in range(rng.randint(2 - bool(surname), 3)))
        if r < 0.85:  # characters never seen elsewhere (tiny-model-notes lesson 1)
            return "".join(chr(rng.randint(*CJK_RANGE)) for _ in range(rng.randint(2, 3)))
        if r < 0.9:
            return "".join(rng.choice(given) for _ in range(rng.randint(2, 4)))
        return self._english()  # a Latin name inside a Chinese sentence


class CorpusBuilder:
    """Draws training dialogues ({"task": ..., "messages": [...]}) from the hand-written and templated parts."""

    def __init__(self, seed: int, pieces: Sequence[str] = ()):
        self.rng = random.Random(seed)
        concepts, chat = load_jsonl("concepts.jsonl"), load_jsonl("chat.jsonl")
        heldout = load_json("heldout_names.json")
        self.qa = {lang: qa_pairs(concepts, lang) + qa_pairs(chat, lang) for lang in ("en", "zh")}
        self.concept_qa = {lang: qa_pairs(concepts, lang) for lang in ("en", "zh")}
        self.names = NameSampler(self.rng, load_json("names.json"), frozenset(sum(heldout.values(), [])), pieces)

    def system(self) -> list[dict]:
        if self.rng.random() < 0.6:
            return []
        return [{"role": "system", "content": self.rng.choice(SYSTEM_PROMPTS)}]

    def qa_turns(self, lang: str, n: int) -> list[dict]:
        turns = []
        for q, a in self.rng.sample(self.qa[lang], n):
            turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return turns

    def _pick(self, main: str, variants: Sequence[str]) -> str:
        return main if self.rng.random() < 0.8 else self.rng.choice(variants)

    def memory(self, lang: str) -> tuple[str, list[dict]]:
        """One memory-demo dialogue: recall with history, or don't-know without it, with optional Q&A between."""
        rng, en = self.rng, lang == "en"
        name = self.names.english() if en else self.names.chinese()
        intro = self._pick(EN_INTRO, EN_INTRO_VARIANTS) if en else self._pick(ZH_INTRO, ZH_INTRO_VARIANTS)
        ask = self._pick(EN_ASK, EN_ASK_VARIANTS) if en else self._pick(ZH_ASK, ZH_ASK_VARIANTS)
        greet, recall, dont_know = (EN_GREET, EN_RECALL, EN_DONT_KNOW) if en else (ZH_GREET, ZH_RECALL, ZH_DONT_KNOW)
        qa_lang = lang if rng.random() < 0.85 else ("zh" if en else "en")
        r = rng.random()
        before = self.qa_turns(qa_lang, 1) if rng.random() < 0.05 else []
        introduce = [{"role": "user", "content": intro.format(name=name)},
                     {"role": "assistant", "content": greet.format(name=name)}]
        if r < 0.35:
            task, turns = "recall", introduce + [{"role": "user", "content": ask}]
        elif r < 0.6:
            between = self.qa_turns(qa_lang, 1 if rng.random() < 0.75 else 2)
            task, turns = "recall_after_qa", introduce + between + [{"role": "user", "content": ask}]
        elif r < 0.65:
            task, turns = "greet", introduce
        elif r < 0.72:
            task, turns = "qa_after_name", introduce + self.qa_turns(qa_lang, rng.randint(1, 2))
        elif r < 0.85:
            task, turns = "dont_know", [{"role": "user", "content": ask}]
            before = []
        else:
            task, turns = "dont_know_after_qa", self.qa_turns(qa_lang, 1 if rng.random() < 0.75 else 2) + [
                {"role": "user", "content": ask}]
        if turns[-1]["role"] == "user":
            answer = dont_know if task.startswith("dont_know") else recall.format(name=name)
            turns.append({"role": "assistant", "content": answer})
        return f"{task}_{lang}", before + turns

    def long_recall(self, lang: str, qa: list[dict]) -> list[dict]:
        """The name given first, then many Q&A turns, then the name question."""
        en = lang == "en"
        name = self.names.english() if en else self.names.chinese()
        intro, greet, ask, recall = (EN_INTRO, EN_GREET, EN_ASK, EN_RECALL) if en else (ZH_INTRO, ZH_GREET, ZH_ASK, ZH_RECALL)
        return [{"role": "user", "content": intro.format(name=name)},
                {"role": "assistant", "content": greet.format(name=name)},
                *qa,
                {"role": "user", "content": ask},
                {"role": "assistant", "content": recall.format(name=name)}]

    def repeat(self, lang: str) -> list[dict]:
        """"Repeat after me: X" -> "X": a dense copy drill, so the attention heads that copy names form early."""
        rng = self.rng
        sample = self.names.english if lang == "en" else self.names.chinese
        words = [sample() for _ in range(rng.randint(1, 4))]
        text = (" " if lang == "en" else "、").join(words)
        ask = rng.choice(EN_REPEAT if lang == "en" else ZH_REPEAT).format(text=text)
        return [{"role": "user", "content": ask}, {"role": "assistant", "content": text}]

    def example(self, progress: float = 1.0) -> dict:
        """One training dialogue; ``progress`` (0..1 through training) front-loads the copy drills."""
        rng = self.rng
        lang = "en" if rng.random() < 0.5 else "zh"
        if rng.random() < (REPEAT_SHARE_EARLY if progress < REPEAT_EARLY_UNTIL else REPEAT_SHARE):
            return {"task": f"repeat_{lang}", "messages": self.system() + self.repeat(lang)}
        r = rng.random()
        if r < MEMORY_SHARE:  # English names are the harder ones to copy (tiny-model-notes), so more of them
            task, turns = self.memory("en" if rng.random() < 0.7 else "zh")
        elif r < 0.9:
            task, turns = f"qa_{lang}", self.qa_turns(lang, 1)
        elif r < 0.97:
            task, turns = f"multi_qa_{lang}", self.qa_turns(lang, 2)
        else:
            task, turns = f"long_{lang}", self.qa_turns(lang, rng.randint(3, 6))
            if rng.random() < 0.5:  # a name given early must still be found late in a long chat
                task, turns = f"long_recall_{lang}", self.long_recall(lang, turns)
        return {"task": task, "messages": self.system() + turns}


def build_corpus(seed: int, n_examples: int, pieces: Sequence[str] = ()) -> list[dict]:
    """``n_examples`` seeded training dialogues; ``pieces`` are tokenizer sub-words used to build names."""
    builder = CorpusBuilder(seed, pieces)
    return [builder.example() for _ in range(n_examples)]


def tokenizer_texts() -> list[str]:
    """Text the tokenizer is trained on: the hand-written corpus, templates, prompts and Chinese name characters.

    English name lists stay out: their merges made name-only pieces ("ĠBeat" on the way to "ĠBeatriz") that
    training names almost never contain, so held-out names holding them were not copied (docs/bundled-model.md).
    """
    names = load_json("names.json")
    texts = []
    for name in ("concepts.jsonl", "chat.jsonl"):
        for g in load_jsonl(name):
            for lang in ("en", "zh"):
                texts += g[lang]["q"] + [g[lang]["a"]]
    templates = [EN_INTRO, EN_GREET, EN_ASK, EN_RECALL, EN_DONT_KNOW, ZH_INTRO, ZH_GREET, ZH_ASK, ZH_RECALL,
                 ZH_DONT_KNOW, *EN_REPEAT, *ZH_REPEAT, *EN_INTRO_VARIANTS, *EN_ASK_VARIANTS, *ZH_INTRO_VARIANTS,
                 *ZH_ASK_VARIANTS]
    texts += [t.format(name="", text="") for t in templates] * 20 + SYSTEM_PROMPTS * 5
    # Each name character several times, so every one becomes a single token (tiny-model-notes lesson 1).
    texts += ["".join(names["zh_surnames"]) * 4, names["zh_given_chars"] * 4]
    return texts


def dialogue_line(example: dict) -> str:
    """One dialogue as a JSON line, as written by the CLI and hashed by the trainer."""
    return json.dumps(example, ensure_ascii=False) + "\n"


def corpus_sha256(examples: Sequence[dict]) -> str:
    """Hash of the corpus as JSON lines, recorded with the trained model."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(dialogue_line(ex).encode("utf-8"))
    return h.hexdigest()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=2000)
    args = parser.parse_args(argv)
    examples = build_corpus(args.seed, args.examples)
    with open(args.out, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(dialogue_line(ex))
    print(f"wrote {len(examples)} dialogues to {args.out} (sha256 {corpus_sha256(examples)[:12]})")


if __name__ == "__main__":
    main()
