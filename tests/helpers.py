"""What several test files share: data locations, backend lists (from the registry), input makers, run helpers.

Test files import from here, never from each other.
"""
import csv
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

import action_kernels as ak
from action_kernels import dispatch
from action_kernels.testing import ALLOWANCES, assert_allowed

# -- data: $ACTION_ACDC (the variable the CLI reads), else ../shared/data beside the repository (CI provides it) -------
SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data")


def acdc_root(environ=os.environ) -> str:
    """The ACDC HDF5 folder the tests read: $ACTION_ACDC, else $ACDC_ROOT (the tests' old variable: accepted with a
    FutureWarning, ignored when ACTION_ACDC is set), else ../shared/data/acdc beside the repository."""
    if environ.get("ACTION_ACDC"):
        return environ["ACTION_ACDC"]
    if environ.get("ACDC_ROOT"):
        warnings.warn(f"ACDC_ROOT={environ['ACDC_ROOT']} is deprecated: set ACTION_ACDC, the variable the tests and "
                      f"the `action` command both read", FutureWarning, stacklevel=2)
        return environ["ACDC_ROOT"]
    return os.path.join(SHARED, "acdc")


ACDC = acdc_root()
NIFTI = os.path.join(SHARED, "nifti")
needs_acdc = pytest.mark.skipif(not os.path.isdir(os.path.join(ACDC, "data")),
                                reason=f"ACDC HDF5 data not found at {ACDC} (CI provides ../shared/data/acdc; "
                                       f"or set ACTION_ACDC)")
needs_nifti = pytest.mark.skipif(not os.path.isdir(NIFTI), reason=f"real NIfTI fixtures not found at {NIFTI}")

# -- backends, from the registry -----------------------------------------------------------------------------------
FUSED = dispatch.FUSED  # every backend with kernels of its own: each is tested against the reference on CPU tensors
# those that run at speed on CPU tensors; the interpreted ones (Triton's interpreter) get smaller shapes
FAST_ON_CPU = tuple(b for b in FUSED if dispatch.REGISTRY[b].cpu != "interpreted")
INTERPRETED_ON_CPU = tuple(b for b in FUSED if dispatch.REGISTRY[b].cpu == "interpreted")


def available(backend: str, device: str = "cpu", dtype=torch.float32) -> bool:
    return dispatch.unavailable_reason(backend, torch.device(device), dtype) == ""


def require(backend: str, device: str = "cpu", dtype=torch.float32) -> None:
    why = dispatch.unavailable_reason(backend, torch.device(device), dtype)
    if why:
        pytest.skip(f"backend {backend!r} unavailable on {device}: {why}")


def free_port() -> int:
    """A TCP port free at the moment, for a torch.distributed rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh_seed() -> int:
    """A new seed per run (printed in failure messages): inputs are fresh random tensors every time."""
    return time.time_ns() % (2**31)


# -- checks of the ops' outputs -------------------------------------------------------------------------------------
TIE = ALLOWANCES["topk_values_fp32"].atol  # fp32 cosines closer than this to the reference's are ties


def assert_topk_equal(got, ref, where):
    """A top-k result (values, indices) equals the reference's: padding, values within the fp32 allowance, and index
    sets equal up to ties (where values tie within rounding, the order may differ only among them)."""
    (v, i), (v0, i0) = got, ref
    assert v.dtype == torch.float32 and i.dtype == torch.int64, where
    assert torch.equal(torch.isfinite(v), torch.isfinite(v0)), f"padding differs [{where}]"
    fin = torch.isfinite(v0)
    assert_allowed(f"values [{where}]", v[fin], v0[fin], "topk_values_fp32")
    mismatch = i != i0
    if mismatch.any():
        close = (v - v0).abs() <= TIE
        assert bool(close[mismatch].all()), f"indices differ beyond ties [{where}]"
    assert torch.equal(i[~fin], torch.full_like(i[~fin], -1)), f"padding indices [{where}]"


# -- inputs of the ops ---------------------------------------------------------------------------------------------
def make_soft(shape, num_keys, dtype, seed, weighted, keys_grad):
    """Student (shape, with grad), teacher (correlated with it, like an EMA teacher), keys (num_keys, D) and an
    optional non-negative weight with zeros, from `seed`."""
    g = torch.Generator().manual_seed(seed)
    d = shape[1]
    s = torch.randn(shape, generator=g).to(dtype)
    t = (s.float() + 0.7 * torch.randn(shape, generator=g)).to(dtype)
    k = torch.randn(num_keys, d, generator=g).to(dtype)
    w = None
    if weighted:
        spatial = (shape[0],) if len(shape) == 2 else (shape[0], *shape[2:])
        w = torch.rand(spatial, generator=g) * (torch.rand(spatial, generator=g) > 0.3)
    return s.requires_grad_(True), t, k.requires_grad_(keys_grad), w


def run_soft(backend, s, t, k, taus, w, reduction):
    """(loss, student grad, keys grad or None) of soft_contrastive_loss on fresh leaves, under a non-uniform
    upstream gradient."""
    s = s.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(k.requires_grad)
    loss = ak.soft_contrastive_loss(s, t, k, *taus, weight=w, reduction=reduction, backend=backend)
    g = torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape) if loss.dim() else torch.tensor(1.0)
    (loss * g).sum().backward()
    return loss.detach(), s.grad, (k.grad if k.requires_grad else None)


def make_topk(n, k_keys, d, classes, seed, skew=False, maps=False):
    """Anchors (n, D) or (2, D, n // 2), labels, keys (k_keys, D) and key labels (with -1 = ignore, or skewed:
    ~80% of the keys in class 0, like background in medical images)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn((2, d, n // 2) if maps else (n, d), generator=g)
    keys = torch.randn(k_keys, d, generator=g)
    ya = torch.randint(0, classes, (2, n // 2) if maps else (n,), generator=g)
    if skew:
        yk = torch.where(torch.rand(k_keys, generator=g) < 0.8, 0, torch.randint(1, classes, (k_keys,), generator=g))
    else:
        yk = torch.randint(-1, classes, (k_keys,), generator=g)
    return a, ya, keys, yk


# -- training runs -------------------------------------------------------------------------------------------------
# the smoke preset shrunk further: ACTION stages in a few seconds each
SMALL = {"data": ACDC, "test_at_end": False, "val_every": 0, "log_every": 1, "tensorboard": False, "threads": 1,
         "unlabelled_batch": 2, "global_dim": 32, "global_bank": 8, "local_dim": 16, "local_bank": 64,
         "local_push": 16, "local_grid": 8, "rep_dim": 16, "queries_per_class": 16, "num_negatives": 16}


def smoke_config(out, **kw):
    from action.config import build_config

    values = {"out": str(out), "data": ACDC, "test_at_end": False, "log_every": 1, "val_every": 0,
              "tensorboard": False, "threads": 1}
    values.update(kw)
    return build_config("smoke", overrides=values)


def stage_config(out, stage, **kw):
    from action.config import build_config

    return build_config("smoke", overrides={**SMALL, "out": str(out), "stage": stage, **kw})


def losses(out):
    """{iteration: loss} of a run folder's train.csv."""
    with open(os.path.join(out, "train.csv")) as fh:
        return {int(r["iteration"]): float(r["loss"]) for r in csv.DictReader(fh)}


def kill_after_checkpoint(script: str, checkpoint, min_iteration: int, timeout: float = 180) -> int:
    """Runs `python -c script`, SIGKILLs it once `checkpoint` holds >= min_iteration iterations; returns the
    iteration the checkpoint holds after the kill."""
    from action.engine import load_checkpoint

    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if checkpoint.exists() and load_checkpoint(str(checkpoint))["iteration"] >= min_iteration:
            break
        if proc.poll() is not None:
            pytest.fail(f"training subprocess ended early: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return load_checkpoint(str(checkpoint))["iteration"]


def sign_model(dims):
    """A 1x1 convolution with logits (x, -x): class 1 exactly where the input is negative."""
    conv = (torch.nn.Conv2d, torch.nn.Conv3d)[dims - 2](1, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, *[1] * dims))
        conv.bias.zero_()
    return conv.eval()


# -- synthetic data and checkpoints (no ../shared/data needed): hostile-input tests ----------------------------------
def synthetic_acdc(root, slices: int = 4, volumes: int = 1, size: int = 32, seed: int = 0, patients: int = 1) -> dict:
    """An ACDC HDF5 folder of random data at `root`: `slices` 2D training slices of each of `patients` patients
    (patient00<p>_frame01_slice_<z>: with --labelled-patients 2 of 3, the third is unlabelled) and `volumes` 3D
    validation (patient1NN_frame01) and test (patient2NN_frame01) volumes of 3 slices, images in [0, 1], labels 0..3
    (squares). Returns {"train_slices": [...], "val": [...], "test": [...]}."""
    import pathlib

    import h5py
    import numpy as np

    root = pathlib.Path(root)
    (root / "data").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    names = {"train_slices": [f"patient{p:03d}_frame01_slice_{z}" for p in range(1, patients + 1)
                              for z in range(slices)],
             "val": [f"patient{100 + i}_frame01" for i in range(volumes)],
             "test": [f"patient{200 + i}_frame01" for i in range(volumes)]}
    for kind, listed in names.items():
        (root / f"{kind}.list").write_text("\n".join(listed) + "\n")
        for name in listed:
            shape = (size, size) if kind == "train_slices" else (3, size, size)
            label = np.zeros(shape, np.uint8)
            label[..., 4:12, 4:12], label[..., 14:22, 14:22], label[..., 24:30, 4:10] = 1, 2, 3
            image = (0.5 * rng.random(shape) + 0.4 * (label > 0)).astype(np.float32)
            with h5py.File(root / "data" / f"{name}.h5", "w") as fh:
                fh["image"], fh["label"] = image, label
    return names


def tiny_checkpoint(path, **overrides) -> str:
    """A checkpoint of an untrained 2D UNet (size 32) written as the trainer writes one (action.engine.checkpoint),
    with the config's `overrides`; returns its path."""
    from action.config import build_config
    from action.data.preprocessing import Preprocessing
    from action.engine.checkpoint import save_checkpoint
    from action.models import build_network

    cfg = build_config("smoke", overrides={"size": 32, "out": os.path.dirname(str(path)), **overrides})
    torch.manual_seed(0)
    net = build_network(cfg)
    state = {"iteration": 1, "stage": cfg.stage, "config": cfg.to_json(), "shards": 1, "model": net.state_dict(),
             "best": 0.0, "best_iteration": 1, "extra": {}, "preprocessing": Preprocessing().to_json()}
    return save_checkpoint(state, str(path))
