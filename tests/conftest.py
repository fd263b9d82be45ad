"""Test-wide JAX setup: 8 fake CPU devices (for sharding tests) and fp32 matmuls.

XLA flags must be set before jax is imported anywhere, so this runs first.

`pytest --kernels onednn` (or `xla`) makes every model and trainer that asks for kernels="auto"
use that backend (`jax_mmdit.ops.set_auto`); tests that name a backend keep theirs. Without it,
"auto" follows its rule: the C++ kernels on one-device CPU meshes, XLA on the 8-device ones.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_addoption(parser):
    parser.addoption(
        "--kernels",
        choices=["auto", "xla", "onednn"],
        default="auto",
        help="what kernels='auto' resolves to in this test run",
    )


def pytest_configure(config):
    kernels = config.getoption("--kernels")
    if kernels != "auto":
        from jax_mmdit import ops

        ops.set_auto(kernels)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def fm_captions(tmp_path_factory):
    """Templated captions of all of Fashion-MNIST (`mmdit encode-text --standin`), stored in fp32."""
    from jax_mmdit.text.encode import cmd_encode_text

    out = tmp_path_factory.mktemp("cap") / "fm"
    assert cmd_encode_text(["--dataset", "fashion_mnist", "--templates", "default", "--standin",
                            "--dtype", "float32", "--out", str(out)]) == 0  # fmt: skip
    return out
