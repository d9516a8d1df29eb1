"""PNG overlays of predictions (image | ground truth | prediction) in radiological display orientation with a
class legend, for `action evaluate`, the final test of a run and TensorBoard (an overlay at each validation).

Display orientation: slices are cut along the third axis of the training orientation (action.data.preprocessing),
so a slice array holds (axis 1 rows, axis 0 columns). display_slice turns it by flips and a transpose (no
interpolation) to the radiological convention: axial slices with the patient's anterior at the top and right on
the viewer's left (seen from the feet); coronal ones with superior at the top and right on the left; sagittal
ones with superior at the top and anterior on the left. HDF5 cases carry no geometry (orientation None) and are
shown as stored.
"""
from __future__ import annotations

import os

import numpy as np
import torch

# a colour per class (background transparent): matplotlib's tab10 cycle, then tab20's, for up to 30 classes
_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}


def _pair(code: str) -> str:
    return {"R": "LR", "L": "LR", "A": "AP", "P": "AP", "S": "IS", "I": "IS"}[code]


def display_slice(slice_yx: np.ndarray, orientation: str | None) -> np.ndarray:
    """slice (rows = array axis 1, columns = array axis 0 of the `orientation` codes, e.g. "RAS") -> the slice as a
    radiologist views it (module docstring); orientation None: unchanged."""
    if orientation is None:
        return slice_yx
    col_code, row_code, normal = orientation[0], orientation[1], orientation[2]
    plane = _pair(normal)
    # what runs down the rows (top -> bottom) and along the columns (left -> right) on screen
    down, across = {"IS": ("P", "L"), "AP": ("I", "L"), "LR": ("I", "P")}[plane]
    out = slice_yx
    if _pair(row_code) != _pair(down):  # the in-plane axes are swapped relative to the display
        out, row_code, col_code = out.T, col_code, row_code
    if row_code != down:
        out = out[::-1, :]
    if col_code != across:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def _colours(num_classes: int):
    import matplotlib

    cycle = list(matplotlib.colormaps["tab10"].colors) + list(matplotlib.colormaps["tab20"].colors)
    return [(0, 0, 0, 0)] + [(*cycle[(c - 1) % len(cycle)][:3], 1.0) for c in range(1, num_classes)]


def _figure(case, prediction: torch.Tensor, slices: int, class_names, orientation):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    image = case.image if case.image.dim() == 3 else case.image[0]  # several channels: the first shown
    ref = case.label if case.label is not None else prediction
    order = torch.argsort((ref > 0).flatten(1).sum(1), descending=True)[:slices].sort().values.tolist()
    num_classes = max(int(prediction.max()), int(ref.max()), 1) + 1
    if class_names is not None:
        num_classes = max(num_classes, len(class_names))
    names = list(class_names) if class_names is not None else [f"class {c}" for c in range(num_classes)]
    names += [f"class {c}" for c in range(len(names), num_classes)]
    colours = _colours(num_classes)
    cmap = ListedColormap(colours)
    cols = 3 if case.label is not None else 2
    fig, axes = plt.subplots(len(order), cols, figsize=(3 * cols, 3 * len(order) + 0.4), squeeze=False)
    for r, z in enumerate(order):
        panels = [("image", None)] + ([("ground truth", case.label[z])] if case.label is not None else []) + \
                 [("prediction", prediction[z])]
        for c, (title, lab) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(display_slice(image[z].float().numpy(), orientation), cmap="gray")
            if lab is not None:
                shown = display_slice(lab.numpy(), orientation)
                ax.imshow(np.ma.masked_equal(shown, 0), cmap=cmap, vmin=-0.5, vmax=num_classes - 0.5, alpha=0.45,
                          interpolation="nearest")
            ax.set_title(f"{title} z={z}", fontsize=8)
            ax.axis("off")
    present = sorted({int(v) for v in torch.unique(ref).tolist() + torch.unique(prediction).tolist()} - {0})
    handles = [Patch(color=colours[c], label=names[c]) for c in present]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    view = "radiological view" if orientation is not None else "array orientation (no geometry)"
    fig.suptitle(f"{case.name} ({view})", fontsize=9)
    fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 0.97))
    return fig, plt


def save_overlays(case, prediction: torch.Tensor, path: str, slices: int = 3, class_names=None,
                  orientation: str | None = None) -> str | None:
    """A PNG with `slices` rows (the slices with the most foreground) of image | ground truth | prediction, in
    radiological display orientation for a case in `orientation` (None: as stored), with a legend of the classes
    shown (class_names, else "class k"). None when matplotlib is not installed."""
    try:
        fig, plt = _figure(case, prediction, slices, class_names, orientation)
    except ImportError:
        return None
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def overlay_image(case, prediction: torch.Tensor, slices: int = 1, class_names=None,
                  orientation: str | None = None) -> np.ndarray | None:
    """The overlay of save_overlays as an RGB array (H, W, 3) uint8 (for TensorBoard's add_image); None without
    matplotlib."""
    try:
        fig, plt = _figure(case, prediction, slices, class_names, orientation)
    except ImportError:
        return None
    fig.set_dpi(80)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb
