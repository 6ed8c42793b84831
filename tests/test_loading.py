"""The one loader: what a checkpoint directory holds decides what `load_model` returns or says."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from swiftkv.distill.config import load_config
from swiftkv.loading import EMBEDDED_MODELS, TOKENIZER_FILES, load_model

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "swiftkv"


def test_a_damaged_tokenizer_is_an_error_naming_the_checkpoint(chat_dir):
    (chat_dir / "tokenizer.json").write_text('{"version": "1.0", "model": ')  # cut off mid-write
    with pytest.raises(ValueError, match="tokenizer") as error:
        load_model(chat_dir)
    assert str(chat_dir) in str(error.value) and "tokenizer.json" in str(error.value)


def test_a_checkpoint_without_tokenizer_files_loads_its_weights_alone(chat_dir):
    assert load_model(chat_dir)[1] is not None
    for name in TOKENIZER_FILES:
        (chat_dir / name).unlink(missing_ok=True)
    model, tokenizer = load_model(chat_dir)
    assert tokenizer is None and model.config.num_hidden_layers == 6


def test_example_configs_name_a_model_that_needs_no_machine_path():
    # configs/qwen2.yaml once named ~/.cache/swiftkv/models/...: a path of one machine that ignored SWIFTKV_CACHE.
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        model = load_config(path).model
        assert model in EMBEDDED_MODELS or not Path(model).expanduser().is_absolute() and "~" not in model, path


def test_no_module_imports_the_package_face():
    # `import swiftkv` inside the package runs back up to swiftkv/__init__.py, which imports the modules themselves.
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__init__.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert "swiftkv" not in [alias.name for alias in node.names], path
            elif isinstance(node, ast.ImportFrom) and node.module == "swiftkv":
                for alias in node.names:  # submodules only, never the public API names
                    assert (PACKAGE / f"{alias.name}.py").is_file() or (PACKAGE / alias.name).is_dir(), (path, alias)
