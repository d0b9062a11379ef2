"""LongBench and ZeroSCROLLS: their prompts and generation lengths, loading from local files (--data_dir) or the
hub, prompt encoding, scoring, and one cell of them through the harness."""
from __future__ import annotations

import math

from pathlib import Path

import torch

from utils import UserError
from evals.harness import make_cache, run_generation, summarize_samples
from evals.synthetic import Sample


# ---------------------------------------------------------------------------------------------------------------
# Real benchmarks: LongBench and ZeroSCROLLS
#
# LongBench's prompt templates and generation lengths are its official config (THUDM/LongBench, config/
# dataset2prompt.json and dataset2maxlen.json, MIT licence), transcribed for the 16 English tasks.
LONGBENCH_PROMPTS = {
    'narrativeqa': 'You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:',
    'qasper': 'You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:',
    'multifieldqa_en': 'Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:',
    'hotpotqa': 'Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:',
    '2wikimqa': 'Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:',
    'musique': 'Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:',
    'gov_report': 'You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:',
    'qmsum': 'You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:',
    'multi_news': 'You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:',
    'trec': 'Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}',
    'triviaqa': 'Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}',
    'samsum': 'Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}',
    'passage_count': 'There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ',
    'passage_retrieval_en': 'Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\nThe answer is: ',
    'lcc': 'Please complete the code given below. \n{context}Next line of code:\n',
    'repobench-p': 'Please complete the code given below. \n{context}{input}Next line of code:\n',
}
LONGBENCH_MAX_NEW_TOKENS = {'narrativeqa': 128, 'qasper': 128, 'multifieldqa_en': 64, 'hotpotqa': 32, '2wikimqa': 32, 'musique': 32, 'gov_report': 512, 'qmsum': 512, 'multi_news': 512, 'trec': 64, 'triviaqa': 32, 'samsum': 128, 'passage_count': 32, 'passage_retrieval_en': 32, 'lcc': 64, 'repobench-p': 64}
LONGBENCH_TASKS = tuple(LONGBENCH_PROMPTS)
LONGBENCH_NO_CHAT = ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")  # few-shot / completion tasks
LONGBENCH_HUB_ZIP = "https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip"

# ZeroSCROLLS: generation lengths of its baseline scripts; validation split (the test labels are private).
ZEROSCROLLS_MAX_NEW_TOKENS = {"gov_report": 1024, "summ_screen_fd": 512, "qmsum": 512, "qasper": 128,
                              "narrative_qa": 64, "quality": 10, "musique": 32, "squality": 512,
                              "space_digest": 36, "book_sum_sort": 256}
ZEROSCROLLS_TASKS = tuple(ZEROSCROLLS_MAX_NEW_TOKENS)
ZEROSCROLLS_HUB_ZIP = "https://huggingface.co/datasets/tau/zero_scrolls/resolve/main/{task}.zip"
REAL_TASKS = {"longbench": LONGBENCH_TASKS, "zeroscrolls": ZEROSCROLLS_TASKS}


REAL_SUBDIRS = {"longbench": ("", "longbench", "LongBench"), "zeroscrolls": ("", "zero_scrolls", "zeroscrolls")}


def _local_file(benchmark: str, task: str, data_dir: str) -> Path | None:
    """LongBench: <task>.jsonl; ZeroSCROLLS: <task>.validation.jsonl or <task>/validation.jsonl; either directly in
    data_dir or in its subfolder named after the benchmark (so one --data_dir can hold both)."""
    names = [f"{task}.jsonl"] if benchmark == "longbench" else [f"{task}.validation.jsonl", f"{task}/validation.jsonl"]
    for sub in REAL_SUBDIRS[benchmark]:
        for n in names:
            if (Path(data_dir) / sub / n).is_file():
                return Path(data_dir) / sub / n
    return None


def available_real_tasks(benchmark: str, data_dir: str | None) -> list[str]:
    """The benchmark's tasks that --data_dir holds (all of them when the hub is the source)."""
    if data_dir is None:
        return list(REAL_TASKS[benchmark])
    return [t for t in REAL_TASKS[benchmark] if _local_file(benchmark, t, data_dir) is not None]


def _load_records(benchmark: str, task: str, data_dir: str | None) -> list[dict]:
    import json
    if data_dir is not None:
        path = _local_file(benchmark, task, data_dir)
        if path is None:
            raise UserError(f"--data_dir {data_dir!r} has no {benchmark} file for task {task!r} (expected "
                            f"{task}.jsonl for LongBench, {task}.validation.jsonl for ZeroSCROLLS)")
        with open(path) as fh:
            return [json.loads(line) for line in fh if line.strip()]
    # The hub's per-task files, read through `datasets` (its json builder; the repos' loading scripts are no longer
    # supported by `datasets`).
    url = f"zip://data/{task}.jsonl::{LONGBENCH_HUB_ZIP}" if benchmark == "longbench" else \
        f"zip://{task}/validation.jsonl::{ZEROSCROLLS_HUB_ZIP.format(task=task)}"
    try:
        import datasets
        return [dict(r) for r in datasets.load_dataset("json", data_files=url, split="train")]
    except Exception as e:
        raise UserError(f"cannot load {benchmark} task {task!r} from the Hugging Face hub ({type(e).__name__}); "
                        f"offline, pass --data_dir with its jsonl files in the hub's schema") from None


def _check_fields(rec: dict, needed: tuple, where: str) -> None:
    missing = [k for k in needed if k not in rec]
    if missing:
        raise UserError(f"{where}: record {rec.get('_id', rec.get('id', '?'))!r} lacks field(s) {missing}")


def longbench_samples(task: str, data_dir: str | None = None, limit: int | None = None) -> list[Sample]:
    """LongBench records as Samples: the template up to and with {context} is the compressed part; the rest,
    with {input}, is the question."""
    if task not in LONGBENCH_PROMPTS:
        raise UserError(f"unknown LongBench task {task!r}; accepted: {', '.join(LONGBENCH_TASKS)}")
    head, tail = LONGBENCH_PROMPTS[task].split("{context}")
    out = []
    for rec in _load_records("longbench", task, data_dir)[:limit]:
        _check_fields(rec, ("input", "context", "answers"), f"LongBench {task}")
        out.append(Sample(str(rec.get("_id", len(out))), task, head + rec["context"],
                          tail.replace("{input}", rec["input"] or ""), "", list(rec["answers"]),
                          meta={"benchmark": "longbench", "all_classes": rec.get("all_classes"),
                                "max_new_tokens": LONGBENCH_MAX_NEW_TOKENS[task],
                                "use_chat": task not in LONGBENCH_NO_CHAT}))
    return out


def zeroscrolls_samples(task: str, data_dir: str | None = None, limit: int | None = None) -> list[Sample]:
    """ZeroSCROLLS records as Samples: input[:document_end_index] (instructions + document) is the compressed part,
    the rest (query and answer cue) the question. Records sharing an id are one sample with several gold answers."""
    if task not in ZEROSCROLLS_MAX_NEW_TOKENS:
        raise UserError(f"unknown ZeroSCROLLS task {task!r}; accepted: {', '.join(ZEROSCROLLS_TASKS)}")
    by_id: dict[str, Sample] = {}
    for rec in _load_records("zeroscrolls", task, data_dir):
        _check_fields(rec, ("id", "input", "output", "document_start_index", "document_end_index",
                            "truncation_seperator"), f"ZeroSCROLLS {task}")
        if rec["id"] in by_id:
            by_id[rec["id"]].answers.append(rec["output"])
            continue
        inp, start, end = rec["input"], rec["document_start_index"], rec["document_end_index"]
        if not 0 <= start <= end <= len(inp):
            raise UserError(f"ZeroSCROLLS {task}: record {rec['id']!r} has document indices {start}..{end} outside "
                            f"its input of {len(inp)} characters")
        by_id[rec["id"]] = Sample(str(rec["id"]), task, inp[:end], inp[end:], "", [rec["output"]],
                                  meta={"benchmark": "zeroscrolls", "document_start": start,
                                        "separator": rec["truncation_seperator"],
                                        "max_new_tokens": ZEROSCROLLS_MAX_NEW_TOKENS[task], "use_chat": True})
    return list(by_id.values())[:limit]


def real_samples(benchmark: str, task: str, data_dir: str | None, limit: int | None) -> list[Sample]:
    return (longbench_samples if benchmark == "longbench" else zeroscrolls_samples)(task, data_dir, limit)


def _chat_wrapper(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids the chat template puts before and after a user message (generation prompt included)."""
    marker = "\x00BODY\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=True)
    before, after = text.split(marker)
    enc = lambda t: tokenizer(t, add_special_tokens=False).input_ids  # noqa: E731
    return enc(before), enc(after)


def encode_real(tokenizer, s: Sample, max_prompt_tokens: int) -> tuple[list[int], list[int]]:
    """(context ids, question ids) under the benchmark's truncation, within max_prompt_tokens for the raw prompt.

    LongBench keeps the first and the last half of the prompt's tokens; ZeroSCROLLS cuts the document's end and
    puts the record's truncation separator in its place. Chat-formatted tasks are then wrapped in the template."""
    enc = lambda t: tokenizer(t, add_special_tokens=False).input_ids  # noqa: E731
    chat = s.meta["use_chat"] and getattr(tokenizer, "chat_template", None)
    # LongBench's pred.py tokenizes the raw prompt with the special tokens (a BOS where the tokenizer adds one), and
    # truncates that sequence, BOS included, to its first and last half
    prefix = special_prefix(tokenizer) if s.meta["benchmark"] == "longbench" and not chat else []
    if s.meta["benchmark"] == "longbench":
        c, q = enc(s.context), enc(s.question)
        if len(prefix) + len(c) + len(q) > max_prompt_tokens:
            full, n = c + q, len(c) + len(q)
            first = max_prompt_tokens // 2 - len(prefix)
            kept = list(range(first)) + list(range(n - (max_prompt_tokens - max_prompt_tokens // 2), n))
            c, q = [full[i] for i in kept if i < len(c)], [full[i] for i in kept if i >= len(c)]
    else:
        start = s.meta["document_start"]
        head, doc, q = enc(s.context[:start]), enc(s.context[start:]), enc(s.question)
        if len(head) + len(doc) + len(q) > max_prompt_tokens:
            sep = enc(s.meta["separator"])
            room = max(0, max_prompt_tokens - len(head) - len(q) - len(sep))
            doc = doc[:room] + sep
        c = head + doc
    if chat:
        before, after = _chat_wrapper(tokenizer)
        c, q = before + c, q + after
    return prefix + c, q


def special_prefix(tokenizer) -> list[int]:
    """The ids a tokenizer puts before a text when it adds its special tokens (a BOS, or nothing)."""
    plain = tokenizer("a", add_special_tokens=False).input_ids
    full = tokenizer("a", add_special_tokens=True).input_ids
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return list(full[:i])
    return []


def score_real(s: Sample, prediction: str) -> float:
    import metrics
    if s.meta["benchmark"] == "longbench":
        return metrics.longbench_score(s.task, prediction, s.answers, s.meta.get("all_classes"))
    return metrics.zeroscrolls_score(s.task, prediction, s.answers)


def first_line_done(text: str) -> bool:
    """For tasks scored on their first line only: once a line is complete, the rest cannot change the score."""
    return "\n" in text.lstrip("\n")


def evaluate_real_cell(model, tokenizer, method: str, budget, samples: list[Sample], mode: str, chunk: int,
                       max_prompt_tokens: int, params: dict | None = None, fault: str | None = None,
                       fast: bool = False) -> dict:
    """One LongBench / ZeroSCROLLS cell: the official prompt and truncation, greedy decoding to the task's
    generation length, the official metric (score x100, mean over samples)."""
    return summarize_real(run_real_samples(model, tokenizer, method, budget, samples, mode, chunk,
                                           max_prompt_tokens, params, fault, fast))


def run_real_samples(model, tokenizer, method: str, budget, samples: list[Sample], mode: str, chunk: int,
                     max_prompt_tokens: int, params: dict | None = None, fault: str | None = None,
                     fast: bool = False) -> list[dict]:
    """Each sample's result (what `summarize_real` makes a cell's record of)."""
    import metrics
    per_sample = []
    for s in samples:
        ctx_ids, q_ids = encode_real(tokenizer, s, max_prompt_tokens)
        if fault == "oom":
            raise torch.OutOfMemoryError("injected out-of-memory (ATSKV_INJECT_FAULT)")
        cache, press = make_cache(method, model, budget, len(ctx_ids), params, tokenizer, s.meta["max_new_tokens"])
        stop = first_line_done if (s.meta["benchmark"] == "longbench" and s.task in metrics.FIRST_LINE_ONLY) \
            else None
        r = run_generation(model, tokenizer, cache, ctx_ids, q_ids, s.meta["max_new_tokens"], mode, chunk, press,
                           stop_when=stop, fast=fast)
        r.update(id=s.id, depth=-1.0, answers=s.answers, score=score_real(s, r["prediction"]))
        if s.meta["benchmark"] == "zeroscrolls" and s.task in metrics.ZEROSCROLLS_SUMMARIES:
            r["rouge_parts"] = max((metrics.rouge_parts(r["prediction"], g) for g in s.answers),
                                   key=lambda p: math.prod(p), default=[0.0, 0.0, 0.0])
        per_sample.append(r)
    return per_sample


def summarize_real(per_sample: list[dict]) -> dict:
    """A LongBench / ZeroSCROLLS cell's record from its samples' results (a summary task: corpus-level ROUGE)."""
    import metrics
    out = summarize_samples(per_sample)
    if per_sample and "rouge_parts" in per_sample[0]:   # ZeroSCROLLS' summaries: corpus-level ROUGE
        out["score"] = 100.0 * metrics.corpus_rouge_geometric_mean([r["rouge_parts"] for r in per_sample])
        out["score_rule"] = "geometric mean of corpus-level ROUGE-1/2/Lsum"
    return out


REAL_FILE_HINT = {"longbench": "LongBench files are named <task>.jsonl, e.g. hotpotqa.jsonl",
                  "zeroscrolls": "ZeroSCROLLS files are named <task>.validation.jsonl, e.g. qasper.validation.jsonl"}
