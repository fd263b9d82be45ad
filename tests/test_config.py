"""Configs: typed choices, conflicts and strict loading; the CLI's split between user errors (one
line) and bugs (a traceback); captions under sample grids."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jax_mmdit.config import TrainConfig, get_config
from jax_mmdit.errors import UserError
from jax_mmdit.models import ModelConfig


def test_model_dtype_in_a_train_config_is_an_error_not_silently_overwritten():
    base = get_config("tiny")
    with pytest.raises(UserError, match="set --precision bf16 instead"):
        dataclasses.replace(base, model=dataclasses.replace(base.model, dtype="bfloat16"))
    assert dataclasses.replace(base, precision="bf16").model_for_precision.dtype == "bfloat16"


def test_a_saved_config_round_trips_and_an_unknown_field_is_named_not_dropped():
    cfg = get_config("tiny")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    d = cfg.to_dict()
    d["model"]["num_head"] = 4  # a renamed field
    d["learning_rate"] = 1e-3
    with pytest.raises(UserError, match=r"learning_rate, model\.num_head"):
        TrainConfig.from_dict(d)
    # A field added since the run was written takes its default.
    d = cfg.to_dict()
    del d["kernels"]
    assert TrainConfig.from_dict(d).kernels == "auto"


def test_string_choices_are_checked_in_python_too():
    with pytest.raises(UserError, match="mlp must be one of"):
        ModelConfig(mlp="relu")
    with pytest.raises(UserError, match="kernels must be one of"):
        dataclasses.replace(get_config("tiny"), kernels="fast")


def _cli(*args, code=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)
    argv = ["-m", "jax_mmdit.cli", *args] if code is None else ["-c", code]
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=120)


def test_help_lists_the_choices_and_a_typo_is_rejected():
    r = _cli("train", "--help")
    assert r.returncode == 0
    choice_sets = ("{dit,mmdit}", "{auto,xla,onednn}", "{uniform,logit_normal,mode}", "{euler,heun,ddpm,ddim,meanflow}")
    for choices in choice_sets:
        assert choices in r.stdout, choices
    r = _cli("train", "--config", "tiny", "--model.arch", "ditt")
    assert r.returncode != 0 and "ditt" in r.stderr and "Traceback" not in r.stderr


def test_user_errors_are_one_line_and_bugs_keep_their_traceback():
    code = textwrap.dedent(
        """
        import sys
        from jax_mmdit import cli
        from jax_mmdit.errors import UserError
        def fail(argv):
            raise (UserError if argv == ["user"] else ValueError)("what went wrong")
        sys.exit(cli.run_guarded(fail, sys.argv[1:]))
        """
    )
    user = subprocess.run([sys.executable, "-c", code, "user"], capture_output=True, text=True, timeout=60)
    assert user.returncode == 1 and user.stderr.strip() == "mmdit: error: what went wrong"
    bug = subprocess.run([sys.executable, "-c", code, "bug"], capture_output=True, text=True, timeout=60)
    assert bug.returncode != 0 and "Traceback" in bug.stderr and "ValueError: what went wrong" in bug.stderr


def test_sample_grids_carry_the_class_names_under_the_images(tmp_path):
    from PIL import Image

    from jax_mmdit.eval import images as imgs

    x = np.full((4, 28, 28, 1), 128, np.uint8)
    plain = imgs.save_grid_png(tmp_path / "plain.png", x, ncols=4, scale=2)
    named = imgs.save_grid_png(
        tmp_path / "named.png", x, ncols=4, scale=2, captions=["T-shirt", "Bag", "Coat", "Dress"]
    )
    assert named.shape[1] == plain.shape[1] and named.shape[0] > plain.shape[0]
    strip = named[plain.shape[0] :]
    assert (strip < 64).any() and (strip == 255).mean() > 0.5  # dark text on white
    assert np.array_equal(np.asarray(Image.open(tmp_path / "named.png"))[..., None], named)


def test_attention_is_a_backend_choice_of_the_run_and_old_saved_configs_migrate():
    with pytest.raises(UserError, match="attention='cudnn' runs in bf16 or fp16"):
        TrainConfig(attention="cudnn")
    assert TrainConfig(attention="cudnn", precision="bf16").attention == "cudnn"
    assert "attention" not in {f.name for f in dataclasses.fields(ModelConfig)}
    # A run saved when attention was a model field loads with it moved, not dropped.
    old = get_config("tiny").to_dict()
    old["model"]["attention"] = old.pop("attention")
    old["model"]["attention"] = "xla"
    assert TrainConfig.from_dict(old).attention == "xla"


def test_a_moved_vae_may_change_on_resume_but_not_the_latents():
    import dataclasses

    from jax_mmdit.config import config_differences, get_config

    saved = get_config("fashion_mnist_latents")
    moved = dataclasses.replace(saved, data=dataclasses.replace(saved.data, vae="elsewhere/vae"))
    assert config_differences(saved.to_dict(), moved) == []  # the VAE is checked by its weights' hash
    other = dataclasses.replace(saved, data=dataclasses.replace(saved.data, source="other/latents"))
    assert config_differences(saved.to_dict(), other) == ["data.source: './latents/fashion_mnist' -> 'other/latents'"]
