"""Official scoring of LongBench and ZeroSCROLLS, written from their definitions.

LongBench (THUDM/LongBench, `metrics.py` / `eval.py`): every metric scores one prediction against one gold answer in
[0, 1]; a sample's score is the max over its gold answers; a task's score is the mean x 100. For trec, triviaqa,
samsum (and lsht) only the prediction's first line is scored.

ZeroSCROLLS (tau/zero_scrolls, `metrics/`): the geometric mean of the corpus-level ROUGE-1/2/L for the summaries,
SQuAD-style F1 for the open QA tasks, accuracy of the first A-D letter for quality, an exponential similarity of
percentages for space_digest (0 without a '%') and the concordance index of an order for book_sum_sort (0 unless
the prediction is a permutation of the gold ids). The official metric scripts are not in this workplace's stored
copies: these three rules follow issue 25's line-by-line reading of them.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter

# ---------------------------------------------------------------------------------------------------------------
# Normalisation and F1 (LongBench's `normalize_answer`, the SQuAD rule)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, gold: str, **_) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(gold).split())


# ---------------------------------------------------------------------------------------------------------------
# ROUGE: LongBench's with the `rouge` package, as its metrics.py; ZeroSCROLLS' with Google's `rouge-score`

_SCORERS: dict = {}


def _rouge(kind: tuple[str, ...]):
    if kind not in _SCORERS:
        from rouge_score import rouge_scorer
        _SCORERS[kind] = rouge_scorer.RougeScorer(list(kind), use_stemmer=False)
    return _SCORERS[kind]


def rouge_l_score(prediction: str, gold: str, **_) -> float:
    """LongBench's ROUGE-L (its metrics.py `rouge_score`): the `rouge` package's summary-level ROUGE-L F with its own
    tokenisation, `Rouge().get_scores([prediction], [gold], avg=True)["rouge-l"]["f"]`; 0 where that raises (e.g.
    an empty prediction), as the official code's bare except does."""
    from rouge import Rouge
    try:
        return float(Rouge().get_scores([prediction], [gold], avg=True)["rouge-l"]["f"])
    except Exception:   # noqa: BLE001 (the official code returns 0 on any error)
        return 0.0


def rouge_parts(prediction: str, gold: str) -> list[float]:
    """ROUGE-1, ROUGE-2 and ROUGE-Lsum F-measures of one summary (sentences split on newlines, as SCROLLS does)."""
    if not prediction.strip() or not gold.strip():
        return [0.0, 0.0, 0.0]
    s = _rouge(("rouge1", "rouge2", "rougeLsum")).score(gold, prediction)
    return [s["rouge1"].fmeasure, s["rouge2"].fmeasure, s["rougeLsum"].fmeasure]


def rouge_geometric_mean(prediction: str, gold: str, **_) -> float:
    """One summary's geometric mean of ROUGE-1, ROUGE-2 and ROUGE-Lsum (a sample's own score; the task's score is
    `corpus_rouge_geometric_mean`)."""
    return math.prod(rouge_parts(prediction, gold)) ** (1 / 3)


def corpus_rouge_geometric_mean(parts: list[list[float]]) -> float:
    """ZeroSCROLLS' summary score of a task: the geometric mean of the corpus-level ROUGE-1, ROUGE-2 and ROUGE-Lsum
    (each the mean over the samples), not the mean of the samples' geometric means."""
    if not parts:
        return 0.0
    means = [sum(p[i] for p in parts) / len(parts) for i in range(3)]
    return math.prod(means) ** (1 / 3)


ZEROSCROLLS_SUMMARIES = ("gov_report", "summ_screen_fd", "qmsum", "squality")


# ---------------------------------------------------------------------------------------------------------------
# LongBench's task-specific scores

def classification_score(prediction: str, gold: str, all_classes: list[str] | None = None, **_) -> float:
    """trec: the class names found in the prediction, minus those that are only part of the gold name; 1/n when
    the gold is among the n left, else 0."""
    found = [c for c in (all_classes or []) if c in prediction]
    found = [c for c in found if not (c in gold and c != gold)]
    return 1.0 / len(found) if gold in found else 0.0


def retrieval_score(prediction: str, gold: str, **_) -> float:
    """passage_retrieval: the share of the numbers in the prediction that equal the gold paragraph's number."""
    m = re.findall(r"Paragraph (\d+)", gold)
    if not m:
        return 0.0
    numbers = re.findall(r"\d+", prediction)
    return sum(n == m[0] for n in numbers) / len(numbers) if numbers else 0.0


def count_score(prediction: str, gold: str, **_) -> float:
    """passage_count: the share of the numbers in the prediction that equal the gold count."""
    numbers = re.findall(r"\d+", prediction)
    return sum(n == str(gold) for n in numbers) / len(numbers) if numbers else 0.0


def code_sim_score(prediction: str, gold: str, **_) -> float:
    """lcc / repobench-p: fuzzywuzzy's integer `fuzz.ratio` / 100 (as LongBench's metrics.py) of the prediction's first
    line that holds no '`', '#' or '//'."""
    import warnings
    with warnings.catch_warnings():   # fuzzywuzzy warns that it uses difflib without python-Levenshtein
        warnings.simplefilter("ignore")
        from fuzzywuzzy import fuzz
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return fuzz.ratio(line, gold) / 100.0


LONGBENCH_METRICS = {
    "narrativeqa": qa_f1_score, "qasper": qa_f1_score, "multifieldqa_en": qa_f1_score, "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score, "musique": qa_f1_score, "triviaqa": qa_f1_score,
    "gov_report": rouge_l_score, "qmsum": rouge_l_score, "multi_news": rouge_l_score, "samsum": rouge_l_score,
    "trec": classification_score, "passage_retrieval_en": retrieval_score, "passage_count": count_score,
    "lcc": code_sim_score, "repobench-p": code_sim_score,
}
FIRST_LINE_ONLY = ("trec", "triviaqa", "samsum", "lsht")


def longbench_score(task: str, prediction: str, answers: list[str], all_classes=None) -> float:
    """One sample's score in [0, 1]: the max over the gold answers (x100 is applied to the task mean)."""
    if task not in LONGBENCH_METRICS:
        raise ValueError(f"unknown LongBench task {task!r}; known: {', '.join(LONGBENCH_METRICS)}")
    if task in FIRST_LINE_ONLY:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = LONGBENCH_METRICS[task]
    return max((metric(prediction, g, all_classes=all_classes) for g in answers), default=0.0)


# ---------------------------------------------------------------------------------------------------------------
# ZeroSCROLLS

def first_letter_accuracy(prediction: str, gold: str, **_) -> float:
    """quality: the first of the letters A-D that the prediction writes as a standalone letter must be the gold's."""
    def letter(text):
        m = re.search(r"\b([ABCD])\b", text)
        return m.group(1) if m else None
    p = letter(prediction)
    return float(p is not None and p == letter(gold))


def _percent(text: str, sign_needed: bool) -> float | None:
    m = re.search(r"(\d+(?:\.\d+)?)\s*%", text) or (None if sign_needed else re.search(r"(\d+(?:\.\d+)?)", text))
    return float(m.group(1)) if m else None


def exp_similarity(prediction: str, gold: str, **_) -> float:
    """space_digest: 0.5 ** (|gold% - predicted%| / 10); 0 when the prediction holds no percentage (a number
    without '%' is not one)."""
    p, g = _percent(prediction, sign_needed=True), _percent(gold, sign_needed=False)
    if p is None or g is None:
        return 0.0
    return 0.5 ** (abs(g - p) / 10.0)


def concordance_index(prediction: str, gold: str, **_) -> float:
    """book_sum_sort: 0 unless the prediction's ids are a permutation of the gold's (each id once, none missing,
    none added); then the share of pairs of ids that the predicted order puts in the gold's order."""
    gold_ids = re.findall(r"\d+", gold)
    pred_ids = re.findall(r"\d+", prediction)
    if sorted(pred_ids) != sorted(gold_ids):
        return 0.0
    rank = {n: i for i, n in enumerate(pred_ids)}
    pairs = [(a, b) for i, a in enumerate(gold_ids) for b in gold_ids[i + 1:]]
    if not pairs:
        return 0.0
    right = sum(1 for a, b in pairs if a in rank and b in rank and rank[a] < rank[b])
    return right / len(pairs)


ZEROSCROLLS_METRICS = {
    "gov_report": rouge_geometric_mean, "summ_screen_fd": rouge_geometric_mean, "qmsum": rouge_geometric_mean,
    "squality": rouge_geometric_mean, "qasper": qa_f1_score, "narrative_qa": qa_f1_score, "musique": qa_f1_score,
    "quality": first_letter_accuracy, "space_digest": exp_similarity, "book_sum_sort": concordance_index,
}


def zeroscrolls_score(task: str, prediction: str, answers: list[str]) -> float:
    if task not in ZEROSCROLLS_METRICS:
        raise ValueError(f"unknown ZeroSCROLLS task {task!r}; known: {', '.join(ZEROSCROLLS_METRICS)}")
    metric = ZEROSCROLLS_METRICS[task]
    return max((metric(prediction, g) for g in answers), default=0.0)
