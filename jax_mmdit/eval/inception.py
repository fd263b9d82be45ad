"""The FID Inception-v3 (TensorFlow's 2015-12-05 graph, as ported by pytorch-fid and torch-fidelity) in Flax NNX.

FID, sFID, Inception Score and precision/recall are only comparable across papers when computed with
this exact network and preprocessing, so the layout follows torch-fidelity's `FeatureExtractorInceptionV3`
(NHWC here): the FID-specific blocks (avg-pools that ignore padding, a max-pool in the last block) and
parameter names equal to the torch state dict's, so its `.pth` loads key for key.

Resizing to 299x299 happens inside the model, chosen at construction:
- "tf1" (default): TensorFlow 1.x `resize_bilinear(align_corners=False)`, which samples at `i * in/out`
  (no half-pixel centres), then (x - 128) / 128: torch-fidelity and ADM's evaluator.
- "pytorch": `F.interpolate(bilinear, align_corners=False)` (half-pixel centres) on x / 255, then 2x - 1:
  pytorch-fid.
Both are two small interpolation matrices applied with einsum: exact, and cheap next to the network.

`"spatial"` is ADM's sFID tensor `mixed_6/conv:0` (first 7 channels): in torch names that is
`Mixed_6d.branch1x1` (the TF graph's mixed, mixed_1, ... mixed_10 are Mixed_5b ... Mixed_7c), whose output
is the first 192 channels of Mixed_6d's, so we take Mixed_6d[..., :7], flattened in TF's (h, w, c) order.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jax_mmdit.errors import UserError

Resize = Literal["tf1", "pytorch"]
SIZE = 299
FEATURE_DIMS = {"pool": 2048, "logits_unbiased": 1008, "logits": 1008, "spatial": 7 * 17 * 17}
WEIGHT_URLS = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
)
# the last name of each parameter, ours -> torch's (conv/fc weights, BatchNorm)
TORCH_NAMES = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var", "bias": "bias"}
ConvFactory = Callable[..., "BasicConv2d"]  # BasicConv2d with dtype/precision/rngs bound


def resize_matrix(in_size: int, out_size: int, method: Resize) -> np.ndarray:
    """(out_size, in_size) bilinear weights, with source positions rounded to float32 as the references
    round them: tf1 `i * scale`; pytorch `scale * (i + 0.5) - 0.5` as one fused multiply-add (torch's CPU
    and CUDA kernels are compiled with FMA contraction; without it 1 pixel in ~300 moves by an ulp)."""
    scale = np.float32(in_size / out_size)
    i = np.arange(out_size, dtype=np.float32)
    if method == "tf1":
        src = i * scale
    else:  # float32 * float32 is exact in float64, so this rounds once, like an FMA
        src = np.maximum((np.float64(scale) * (i + np.float32(0.5)) - 0.5).astype(np.float32), 0)
    lo = np.floor(src).astype(np.int64)
    frac = src - lo.astype(np.float32)
    hi = np.minimum(lo + 1, in_size - 1)
    m = np.zeros((out_size, in_size), np.float32)
    np.add.at(m, (np.arange(out_size), lo), 1 - frac)
    np.add.at(m, (np.arange(out_size), hi), frac)
    return m


def resize_bilinear(x_BxHxWxC: jax.Array, size: tuple[int, int], method: Resize) -> jax.Array:
    """Bilinear resize of a float batch to `size` (no antialiasing, as both references)."""
    mh = resize_matrix(x_BxHxWxC.shape[1], size[0], method)
    mw = resize_matrix(x_BxHxWxC.shape[2], size[1], method)
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", mh, x_BxHxWxC, precision=hi)
    return jnp.einsum("pw,bowc->bopc", mw, x, precision=hi)


def max_pool(x: jax.Array, stride: int, pad: int = 0) -> jax.Array:
    """3x3 max-pool; padding never wins (-inf), as in torch."""
    padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), padding)


def avg_pool_same(x_BxHxWxC: jax.Array) -> jax.Array:
    """3x3 stride-1 avg-pool over the valid pixels only (TF's, = torch's count_include_pad=False)."""
    padding = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x_BxHxWxC, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), padding)
    ones = np.ones((1, *x_BxHxWxC.shape[1:3], 1), np.float32)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), padding)
    return total / count.astype(total.dtype)


class BasicConv2d(nnx.Module):
    """Conv (no bias) -> BatchNorm (inference, eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1, pad: str = "VALID", **opts):
        """`pad` "SAME" is torch's (k // 2) padding: every padded conv here is stride 1 with odd kernels.
        `opts`: dtype, precision and rngs, the same for every conv (bound by `InceptionV3`)."""
        kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.conv = nnx.Conv(cin, cout, kernel, strides=stride, padding=pad, use_bias=False, **opts)
        self.bn = nnx.BatchNorm(cout, epsilon=1e-3, use_running_average=True, dtype=opts["dtype"], rngs=opts["rngs"])

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


class InceptionA(nnx.Module):
    def __init__(self, cin: int, pool_features: int, conv: ConvFactory):
        self.branch1x1 = conv(cin, 64, 1)
        self.branch5x5_1 = conv(cin, 48, 1)
        self.branch5x5_2 = conv(48, 64, 5, pad="SAME")
        self.branch3x3dbl_1 = conv(cin, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, pad="SAME")
        self.branch3x3dbl_3 = conv(96, 96, 3, pad="SAME")
        self.branch_pool = conv(cin, pool_features, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch1x1(x), b5, b3, self.branch_pool(avg_pool_same(x))], axis=-1)


class InceptionB(nnx.Module):
    def __init__(self, cin: int, conv: ConvFactory):
        self.branch3x3 = conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = conv(cin, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, pad="SAME")
        self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, max_pool(x, 2)], axis=-1)


class InceptionC(nnx.Module):
    def __init__(self, cin: int, c7: int, conv: ConvFactory):
        self.branch1x1 = conv(cin, 192, 1)
        self.branch7x7_1 = conv(cin, c7, 1)
        self.branch7x7_2 = conv(c7, c7, (1, 7), pad="SAME")
        self.branch7x7_3 = conv(c7, 192, (7, 1), pad="SAME")
        self.branch7x7dbl_1 = conv(cin, c7, 1)
        self.branch7x7dbl_2 = conv(c7, c7, (7, 1), pad="SAME")
        self.branch7x7dbl_3 = conv(c7, c7, (1, 7), pad="SAME")
        self.branch7x7dbl_4 = conv(c7, c7, (7, 1), pad="SAME")
        self.branch7x7dbl_5 = conv(c7, 192, (1, 7), pad="SAME")
        self.branch_pool = conv(cin, 192, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            d = layer(d)
        d = self.branch7x7dbl_5(d)
        return jnp.concatenate([self.branch1x1(x), b7, d, self.branch_pool(avg_pool_same(x))], axis=-1)


class InceptionD(nnx.Module):
    def __init__(self, cin: int, conv: ConvFactory):
        self.branch3x3_1 = conv(cin, 192, 1)
        self.branch3x3_2 = conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = conv(cin, 192, 1)
        self.branch7x7x3_2 = conv(192, 192, (1, 7), pad="SAME")
        self.branch7x7x3_3 = conv(192, 192, (7, 1), pad="SAME")
        self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, max_pool(x, 2)], axis=-1)


class InceptionE(nnx.Module):
    """Mixed_7b pools with avg (padding excluded); Mixed_7c with max: a quirk of the TF graph kept for FID."""

    def __init__(self, cin: int, pool: Literal["avg", "max"], conv: ConvFactory):
        self.pool = pool
        self.branch1x1 = conv(cin, 320, 1)
        self.branch3x3_1 = conv(cin, 384, 1)
        self.branch3x3_2a = conv(384, 384, (1, 3), pad="SAME")
        self.branch3x3_2b = conv(384, 384, (3, 1), pad="SAME")
        self.branch3x3dbl_1 = conv(cin, 448, 1)
        self.branch3x3dbl_2 = conv(448, 384, 3, pad="SAME")
        self.branch3x3dbl_3a = conv(384, 384, (1, 3), pad="SAME")
        self.branch3x3dbl_3b = conv(384, 384, (3, 1), pad="SAME")
        self.branch_pool = conv(cin, 192, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = avg_pool_same(x) if self.pool == "avg" else max_pool(x, 1, pad=1)
        parts = [self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3)]
        parts += [self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)]
        return jnp.concatenate(parts, axis=-1)


class InceptionV3(nnx.Module):
    """FID Inception-v3: uint8 or [0, 255] float images B×H×W×{1,3} -> dict of float32 features
    ("pool" B×2048, "logits_unbiased"/"logits" B×1008, "spatial" B×2023). `dtype` is the compute dtype.
    Get one from `load_inception`: constructing it draws random weights, slowly (~20 s on a CPU)."""

    def __init__(
        self,
        resize: Resize = "tf1",
        dtype: Any = jnp.float32,
        precision: jax.lax.PrecisionLike = "highest",
        rngs: nnx.Rngs | None = None,
    ):
        if resize not in ("tf1", "pytorch"):
            raise UserError(f"resize must be 'tf1' or 'pytorch', got {resize!r}.")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.resize, self.dtype, self.precision = resize, dtype, precision
        conv = functools.partial(BasicConv2d, dtype=dtype, precision=precision, rngs=rngs)
        self.Conv2d_1a_3x3 = conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = conv(32, 32, 3)
        self.Conv2d_2b_3x3 = conv(32, 64, 3, pad="SAME")
        self.Conv2d_3b_1x1 = conv(64, 80, 1)
        self.Conv2d_4a_3x3 = conv(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32, conv)
        self.Mixed_5c = InceptionA(256, 64, conv)
        self.Mixed_5d = InceptionA(288, 64, conv)
        self.Mixed_6a = InceptionB(288, conv)
        self.Mixed_6b = InceptionC(768, 128, conv)
        self.Mixed_6c = InceptionC(768, 160, conv)
        self.Mixed_6d = InceptionC(768, 160, conv)
        self.Mixed_6e = InceptionC(768, 192, conv)
        self.Mixed_7a = InceptionD(768, conv)
        self.Mixed_7b = InceptionE(1280, "avg", conv)
        self.Mixed_7c = InceptionE(2048, "max", conv)
        self.fc = nnx.Linear(2048, 1008, rngs=rngs)

    def preprocess(self, images_BxHxWxC: jax.Array) -> jax.Array:
        """Images in [0, 255] -> B×299×299×3 float32 in [-1, 1], resized and scaled as the reference does."""
        shape = jnp.shape(images_BxHxWxC)
        if len(shape) != 4 or shape[-1] not in (1, 3):
            raise UserError(f"Inception expects images B×H×W×C with C 1 or 3, got shape {shape}.")
        x = jnp.asarray(images_BxHxWxC).astype(jnp.float32)
        if self.resize == "tf1":
            x = (resize_bilinear(x, (SIZE, SIZE), "tf1") - 128) / 128
        else:
            x = resize_bilinear(x / 255, (SIZE, SIZE), "pytorch") * 2 - 1
        return jnp.broadcast_to(x, (*x.shape[:3], 3))

    def __call__(self, images_BxHxWxC: jax.Array) -> dict[str, jax.Array]:
        x = self.preprocess(images_BxHxWxC).astype(self.dtype)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(max_pool(x, 2)))
        x = max_pool(x, 2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        x = self.Mixed_6d(x)
        spatial = x[..., :7].astype(jnp.float32).reshape(x.shape[0], -1)
        for block in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool_Bx2048 = x.astype(jnp.float32).mean(axis=(1, 2))
        logits_unbiased = jnp.dot(pool_Bx2048, self.fc.kernel[...].astype(jnp.float32), precision=self.precision)
        logits = logits_unbiased + self.fc.bias[...].astype(jnp.float32)
        return {"pool": pool_Bx2048, "logits_unbiased": logits_unbiased, "logits": logits, "spatial": spatial}


def _torch_key(path: tuple) -> str:
    return ".".join([*map(str, path[:-1]), TORCH_NAMES[path[-1]]])


def _to_torch_axes(path: tuple, ndim: int) -> tuple[int, ...]:
    """Axis order of the torch tensor in ours: conv HWIO -> OIHW, Linear (in, out) -> (out, in)."""
    return {4: (3, 2, 0, 1), 2: (1, 0)}[ndim] if path[-1] == "kernel" else tuple(range(ndim))


@functools.cache  # building the 300-module graph takes ~1 s
def _abstract_model(resize: Resize, dtype: Any, precision: Any) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(nnx.eval_shape(lambda: InceptionV3(resize, dtype, precision)))


def inception_torch_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of the torch state dict (num_batches_tracked aside) -> its shape."""
    _, state = _abstract_model("tf1", jnp.float32, "highest")
    flat = nnx.to_flat_state(state)
    return {_torch_key(p): tuple(v.shape[i] for i in _to_torch_axes(p, v.ndim)) for p, v in flat}


def _numpy_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """torch tensors or arrays -> float32 numpy, checked against the network: one UserError naming what's off."""
    sd = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    sd = {k: v.detach().cpu().float().numpy() if hasattr(v, "detach") else np.asarray(v) for k, v in sd.items()}
    shapes = inception_torch_shapes()
    missing, extra = sorted(set(shapes) - set(sd)), sorted(set(sd) - set(shapes))
    wrong = [f"{k} {sd[k].shape} != {shapes[k]}" for k in sorted(set(sd) & set(shapes)) if sd[k].shape != shapes[k]]
    if missing or extra or wrong:
        found = {"missing": missing, "unexpected": extra, "wrong shape": wrong}
        parts = [f"{what} ({len(keys)}): {keys[:5]}" for what, keys in found.items() if keys]
        raise UserError(f"Not an FID Inception-v3 state dict; {'; '.join(parts)}.")
    return {k: v.astype(np.float32) for k, v in sd.items()}


def inception_from_state_dict(
    state_dict: Mapping[str, Any], resize: Resize = "tf1", dtype: Any = jnp.float32, precision: Any = "highest"
) -> InceptionV3:
    """A torch-named state dict (tensors or arrays) -> `InceptionV3`, every parameter filled from it."""
    sd = _numpy_state_dict(state_dict)
    graphdef, state = _abstract_model(resize, dtype, precision)
    filled = []
    for p, v in nnx.to_flat_state(state):
        value = sd[_torch_key(p)].transpose(np.argsort(_to_torch_axes(p, v.ndim)))
        filled.append((p, v.replace(jnp.asarray(value))))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def read_inception_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """`.pth` (torch, either published file), `.safetensors` or `.npz` -> checked numpy state dict."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"No Inception weights at {path}. Download pytorch-fid's {WEIGHT_URLS[0]} "
            f"(or torch-fidelity's {WEIGHT_URLS[1]}) and pass its path."
        )
    if path.suffix == ".npz":
        with np.load(path) as f:
            return _numpy_state_dict(dict(f))
    if path.suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError as e:
            raise UserError(f"Reading {path.name} needs safetensors: pip install safetensors (or use .npz).") from e
        return _numpy_state_dict(load_file(path))
    try:
        import torch
    except ImportError as e:
        raise UserError(
            f"Reading {path.name} needs torch: pip install 'jax-mmdit[convert]', or convert it once to .npz "
            "with save_inception_npz where torch is installed."
        ) from e
    return _numpy_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def load_inception(
    path: str | Path, resize: Resize = "tf1", dtype: Any = jnp.float32, precision: Any = "highest"
) -> InceptionV3:
    """The FID Inception from pytorch-fid's or torch-fidelity's `.pth` (needs torch) or a `.npz`/`.safetensors`.
    `precision` of the convs: "highest" (true fp32 on GPU/TPU too) matches the references; "default" is faster."""
    return inception_from_state_dict(read_inception_state_dict(path), resize, dtype, precision)


def save_inception_npz(state_dict_or_path: Mapping[str, Any] | str | Path, path: str | Path) -> None:
    """Writes a checked numpy copy of the weights, so later runs load them without torch."""
    if isinstance(state_dict_or_path, (str, Path)):
        sd = read_inception_state_dict(state_dict_or_path)
    else:
        sd = _numpy_state_dict(state_dict_or_path)
    np.savez(path, **sd)


def random_inception_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights under the real names and shapes (torch layout), scaled so activations stay O(1)
    through all 94 convs: for tests that need an Inception file without downloading one."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in inception_torch_shapes().items():
        if key.endswith(("conv.weight", "fc.weight")):
            fan_in = int(np.prod(shape[1:]))
            value = rng.normal(0, math.sqrt((2.0 if key.endswith("conv.weight") else 1.0) / fan_in), shape)
        elif key.endswith("running_var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif key.endswith("bn.weight"):
            value = rng.uniform(0.8, 1.2, shape)
        else:  # bn.bias, running_mean, fc.bias
            value = rng.normal(0, 0.1, shape)
        out[key] = value.astype(np.float32)
    return out


def _forward(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> dict[str, jax.Array]:
    return nnx.merge(graphdef, state)(images)


_forward_jit = jax.jit(_forward, static_argnums=0)  # shared: models of one structure share compilations


class InceptionFeatures:
    """Jitted, batched feature extraction: numpy images in, numpy features out.

    Images go through in chunks of `batch_size` (the last one zero-padded, then trimmed), so each input
    shape compiles once. With `mesh` (one process), chunks are split over `batch_axes` (default: every mesh
    axis, since the weights are replicated) and `batch_size` is rounded up to a multiple of the shards.
    Grayscale is replicated to 3 channels on the host, so it shares the colour compilation.
    """

    def __init__(
        self,
        model: InceptionV3,
        batch_size: int = 64,
        mesh: Mesh | None = None,
        batch_axes: Sequence[str] | None = None,
    ):
        self.graphdef, state = nnx.split(model)
        self.batch_size = batch_size
        self.sharding = None
        if mesh is not None:
            axes = tuple(mesh.axis_names if batch_axes is None else batch_axes)
            shards = math.prod(mesh.shape[a] for a in axes)
            self.batch_size = -(-batch_size // shards) * shards
            self.sharding = NamedSharding(mesh, PartitionSpec(axes))
            state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
        self.state = state

    def _run(self, chunk_BxHxWxC: np.ndarray) -> dict[str, jax.Array]:
        return _forward_jit(self.graphdef, self.state, jax.device_put(chunk_BxHxWxC, self.sharding))

    def __call__(self, images_BxHxWxC: np.ndarray) -> dict[str, np.ndarray]:
        images = np.asarray(images_BxHxWxC)
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise UserError(f"Inception expects images B×H×W×C with C 1 or 3, got shape {images.shape}.")
        if images.dtype != np.uint8:
            images = images.astype(np.float32)
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        n, bs = len(images), self.batch_size
        if n == 0:
            return {k: np.zeros((0, d), np.float32) for k, d in FEATURE_DIMS.items()}
        outs = []
        for start in range(0, n, bs):
            chunk = images[start : start + bs]
            outs.append(self._run(np.pad(chunk, [(0, bs - len(chunk))] + [(0, 0)] * 3)))
            if len(outs) > 1:  # copy the previous chunk back while this one computes
                outs[-2] = jax.device_get(outs[-2])
        outs = jax.device_get(outs)
        return {k: np.concatenate([o[k] for o in outs])[:n] for k in outs[0]}
