"""Reference metric code (torch-fidelity, pytorch-fid) loaded for parity tests without its package `__init__`.

Both packages import torchvision on import, and the torchvision their wheels pull in is a CUDA build that
does not import beside our CPU torch; so we register bare or stub parent modules in `sys.modules` and
import only the submodules we compare against (which need torch, numpy and scipy alone).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

# Everything metric_{fid,isc,kid,prc,ppl} import from torch_fidelity.utils; placeholders, since
# the parity tests call only their pure functions (statistics, distances), never the data pipeline.
TORCH_FIDELITY_UTILS_NAMES = (
    "batch_interp",
    "cache_lookup_one_recompute_on_miss",
    "create_feature_extractor",
    "create_sample_similarity",
    "extract_featuresdict_from_input_id_cached",
    "get_cacheable_input_name",
    "prepare_input_descriptor_from_input_id",
    "prepare_input_from_descriptor",
    "resolve_feature_extractor",
    "resolve_feature_layer_for_metric",
    "sample_random",
)


def _placeholder(name: str):
    def fn(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"torch_fidelity.utils.{name} is stubbed out in tests/reference_impls.py")

    fn.__name__ = name
    return fn


def _install_package(name: str, missing_hint: str) -> None:
    """A bare package object for `name` whose submodules import from the installed directory."""
    if isinstance(sys.modules.get(name), types.ModuleType) and hasattr(sys.modules[name], "__path__"):
        return
    spec = importlib.util.find_spec(name)  # finds the package without executing its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{name} is not installed; the parity tests need it: {missing_hint}")
    pkg = types.ModuleType(name)
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__file__ = spec.origin
    sys.modules[name] = pkg


def torch_fidelity_module(name: str) -> types.ModuleType:
    """`torch_fidelity.<name>` (e.g. "feature_extractor_inceptionv3", "interpolate_compat_tensorflow",
    "metric_fid", "metric_isc", "metric_prc") with `torch_fidelity.utils` stubbed out."""
    _install_package(
        "torch_fidelity", "pip install --no-deps torch-fidelity==0.4.0 (--no-deps: its torchvision breaks torch)"
    )
    if "torch_fidelity.utils" not in sys.modules:
        utils = types.ModuleType("torch_fidelity.utils")
        for n in TORCH_FIDELITY_UTILS_NAMES:
            setattr(utils, n, _placeholder(n))
        sys.modules["torch_fidelity.utils"] = utils
        sys.modules["torch_fidelity"].utils = utils
    return importlib.import_module("torch_fidelity." + name)


def pytorch_fid_score() -> types.ModuleType:
    """`pytorch_fid.fid_score` for its `calculate_frechet_distance`. torchvision and the torch Inception it
    imports are stubbed only while it loads: a stub left behind would fool other code probing torchvision."""
    _install_package("pytorch_fid", "pip install --no-deps pytorch-fid==0.3.0")
    if "pytorch_fid.fid_score" in sys.modules:
        return sys.modules["pytorch_fid.fid_score"]
    stubs = {n: types.ModuleType(n) for n in ("torchvision", "torchvision.transforms", "pytorch_fid.inception")}
    stubs = {n: m for n, m in stubs.items() if n not in sys.modules}
    stubs.get("torchvision", types.ModuleType("unused")).transforms = stubs.get("torchvision.transforms")
    # its argparse setup reads InceptionV3.BLOCK_INDEX_BY_DIM at import time
    inception_stub = type("InceptionV3", (), {"BLOCK_INDEX_BY_DIM": {64: 0, 192: 1, 768: 2, 2048: 3}})
    stubs.get("pytorch_fid.inception", types.ModuleType("unused")).InceptionV3 = inception_stub
    sys.modules.update(stubs)
    try:
        return importlib.import_module("pytorch_fid.fid_score")
    finally:
        for n in stubs:
            sys.modules.pop(n, None)
